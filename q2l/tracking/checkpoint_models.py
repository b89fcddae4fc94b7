"""Each epoch's training checkpoint as an MLflow logged model of the run, linked to its held-out metrics.

The weights are not uploaded again: Ray Train already stores the checkpoint folder (the exact-resume format
of ``q2l/packaging/checkpoint.py``). The logged model ``checkpoint-epoch-NNN`` (model type
``q2l-checkpoint``, tag ``q2l.epoch``) holds a small pointer file, ``checkpoint.json``: the MLflow run, the
epoch, its held-out mAP and the Ray run folder; once Ray has stored the folder its path becomes the tag
``q2l.ray_checkpoint``. The epoch's ``holdout_*`` metrics are logged with the model's id and the held-out
dataset (``RunRecorder.log_metrics``), so the experiment's Models tab ranks checkpoints by held-out mAP.
Ray keeps only the best ``ray.keep_checkpoints`` folders by held-out mAP; the packaged best model is the
run's ``model``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

MODEL_TYPE = "q2l-checkpoint"
POINTER_FILE = "checkpoint.json"
EPOCH_TAG = "q2l.epoch"
PATH_TAG = "q2l.ray_checkpoint"


def model_name(epoch: int) -> str:
    """The logged model name of epoch ``epoch``'s checkpoint (1-based; sorts by epoch)."""
    return f"checkpoint-epoch-{epoch:03d}"


def log_checkpoint_model(recorder, epoch: int, pointer: dict[str, Any]) -> str:
    """The id of epoch ``epoch``'s checkpoint model in the recorder's run, created unless already READY.

    ``pointer`` (JSON-able) is written as ``checkpoint.json``. A resumed run reuses the READY model an
    earlier attempt made for the epoch; a PENDING leftover (that attempt died while creating it) is deleted.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = recorder.client
    name = model_name(epoch)
    for found in recorder.find_models(name):
        if found.status == LoggedModelStatus.READY:
            return found.model_id
        client.delete_logged_model(found.model_id)
    model = client.create_logged_model(
        recorder.experiment_id,
        name=name,
        source_run_id=recorder.run_id,
        tags={EPOCH_TAG: str(epoch)},
        model_type=MODEL_TYPE,
    )
    with tempfile.TemporaryDirectory(prefix="q2l-ckpt-model-") as tmp:
        path = Path(tmp) / POINTER_FILE
        path.write_text(json.dumps(pointer, indent=2, sort_keys=True) + "\n")
        client.log_model_artifact(model.model_id, str(path))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    # the run's Logged models list, as a model logged by ``mlflow.<flavor>.log_model`` gets it
    client.log_outputs(recorder.run_id, [LoggedModelOutput(model.model_id, step=epoch)])
    return model.model_id


def tag_stored_path(recorder, model_id: str, path: str) -> None:
    """Record where Ray stored the checkpoint folder of ``model_id`` (tag ``q2l.ray_checkpoint``)."""
    recorder.client.set_logged_model_tags(model_id, {PATH_TAG: path})
