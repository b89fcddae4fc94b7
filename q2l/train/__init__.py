"""The train layer: one training run as a Ray Train V2 ``TorchTrainer``, recorded in MLflow.

``driver``: builds and runs the trainer on the caller's side; ``worker``: the loop each Ray Train worker runs;
``epoch_report`` and ``final_evaluation``: what the workers report and log; ``failures``: what became of a
launch, read back from MLflow.
"""

from q2l.train.driver import TrainOutcome, build_trainer, default_run_name, resolve_paths, run_training
from q2l.train.epoch_report import BEST_MAP_KEY, EPOCH_KEY
from q2l.train.failures import TrainingInputError, TrainingRunError, recorded_failure
from q2l.train.final_evaluation import FINAL_METRIC

__all__ = [
    "BEST_MAP_KEY",
    "EPOCH_KEY",
    "FINAL_METRIC",
    "TrainOutcome",
    "TrainingInputError",
    "TrainingRunError",
    "build_trainer",
    "default_run_name",
    "recorded_failure",
    "resolve_paths",
    "run_training",
]
