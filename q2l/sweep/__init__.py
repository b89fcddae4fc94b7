"""The sweep layer: a Ray Tune experiment (Optuna search, ASHA stopping) whose trials are Ray Train runs.

``runner``: the sweep, as named steps; ``space``: the search space; ``search`` and ``optuna_search``: the
searcher (trials ASHA stops reach Optuna as PRUNED) and the scheduler; ``study``: the persisted Optuna study
and warm starts; ``resources``: how many trials fit at once; ``storage``: the sweep's state folder, and
``state_integrity``: its digests in MLflow, checked before ``--resume`` loads anything, and
``recorded_storage``: the storage Tune writes through, which records each state file before writing it;
``trial``: one trial;
``results``: Tune's results as rows; ``record``, ``leaderboard``, ``plots``: the sweep's MLflow record.
"""
