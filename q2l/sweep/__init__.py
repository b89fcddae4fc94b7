"""The sweep layer: a Ray Tune experiment (Optuna search, ASHA stopping) whose trials are Ray Train runs.

``space``: the search space; ``runner``: the sweep; ``record``: its MLflow parent run, leaderboard and the
challenger's registration.
"""
