"""q2l: Query2Label multi-label image classifiers, trained and tuned on Ray, recorded in MLflow."""

__version__ = "0.1.0"
