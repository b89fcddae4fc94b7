"""What a run records beyond params and metrics, on a real SQLite MLflow store (no Ray): the data splits as
MLflow datasets, checkpoints as logged models linked to their held-out metrics, MLflow's system metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from q2l import tracking
from q2l.data import build_datasets
from q2l.tracking import checkpoint_models, datasets, system_metrics
from q2l.tracking.run_record import RunRecorder


@pytest.fixture
def cfg(mlflow_store, mlflow_tmp_config):
    return mlflow_tmp_config


@pytest.fixture
def splits(cfg):
    return build_datasets(cfg.data, train=False)


def _open(cfg, launch_id: str = "launch-1", run_id: str | None = None) -> RunRecorder:
    recorder = RunRecorder(cfg)
    recorder.open(tracking.ensure_experiment(cfg), run_id=run_id, run_name="r", launch_id=launch_id)
    return recorder


def _inputs(client, run_id: str) -> dict[str, tuple]:
    """context → (name, digest, source, schema, profile) of a run's dataset inputs."""
    out = {}
    for di in client.get_run(run_id).inputs.dataset_inputs:
        context = {t.key: t.value for t in di.tags}["mlflow.data.context"]
        d = di.dataset
        out[context] = (d.name, d.digest, json.loads(d.source), json.loads(d.schema), json.loads(d.profile))
    return out


def test_splits_are_logged_as_datasets_and_a_promotion_finds_the_same_entity(cfg, splits):
    recorder = _open(cfg)
    try:
        recorder.log_datasets(splits, cfg.data.root)
        recorder.log_datasets(splits, cfg.data.root)  # a resumed run logs them again: still three inputs
    finally:
        recorder.finish()
    inputs = _inputs(recorder.client, recorder.run_id)
    assert sorted(inputs) == ["test", "training", "validation"]
    assert len(recorder.client.get_run(recorder.run_id).inputs.dataset_inputs) == 3
    folder = cfg.data.root.rstrip("/").rsplit("/", 1)[-1]
    for context, split in (("training", "train"), ("validation", "holdout"), ("test", "test")):
        name, digest, source, schema, profile = inputs[context]
        assert name == f"{folder}-{split}"
        assert digest == datasets.split_digest(splits.fingerprint, split)
        assert source == {"uri": cfg.data.root}
        assert [c["name"] for c in schema["mlflow_colspec"]] == ["image", "labels"]
        data = getattr(splits, split)
        assert profile["images"] == len(data) and profile["labels"] == splits.num_classes
        assert profile["label_counts"] == dict(
            zip(splits.label_names, (data.targets > 0).sum(0).tolist(), strict=True)
        )
    assert len({d for _, d, *_ in inputs.values()}) == 3  # one digest per split

    # a promotion evaluation in another experiment logs the same test split: the same name and digest
    promo_cfg = cfg.replace({"mlflow.experiment": "q2l-test-promotions"})
    exp_id = tracking.ensure_experiment(promo_cfg)
    client = recorder.client
    run_id = client.create_run(exp_id).info.run_id
    entity = datasets.log_split(
        client, run_id, "test", splits.test, splits.label_names, splits.fingerprint, cfg.data.root
    )
    client.set_terminated(run_id)
    assert (entity.name, entity.digest) == inputs["test"][:2]
    assert _inputs(client, run_id)["test"][:2] == inputs["test"][:2]

    with pytest.raises(ValueError, match="split must be one of train, holdout, test, got 'val'"):
        datasets.image_split("val", splits.test, splits.label_names, splits.fingerprint, cfg.data.root)


def test_checkpoints_are_logged_models_ranked_by_linked_holdout_metrics(cfg, splits):
    recorder = _open(cfg)
    recorder.log_datasets(splits, cfg.data.root)
    holdout = recorder.datasets["holdout"]
    maps = {1: 41.0, 2: 55.5, 3: 48.25}
    ids = {}
    for epoch, value in maps.items():
        ids[epoch] = checkpoint_models.log_checkpoint_model(recorder, epoch, {"epoch": epoch})
        linked = {"holdout_map": value, "holdout_cf1": value / 2}
        assert recorder.log_metrics(
            {"train_loss": 1.0 / epoch}, epoch, linked=linked, model_id=ids[epoch], dataset=holdout
        )
    checkpoint_models.tag_stored_path(recorder, ids[2], "/ray/run/checkpoint_x")
    recorder.finish()

    client = recorder.client
    ranked = client.search_logged_models(
        [recorder.experiment_id],
        filter_string=f"source_run_id = '{recorder.run_id}'",
        order_by=[{"field_name": "metrics.holdout_map", "ascending": False}],
    )
    assert [m.name for m in ranked] == [
        "checkpoint-epoch-002",
        "checkpoint-epoch-003",
        "checkpoint-epoch-001",
    ]
    best = ranked[0]
    assert best.model_type == checkpoint_models.MODEL_TYPE and best.status.to_int() == 2  # READY
    assert best.tags[checkpoint_models.EPOCH_TAG] == "2"
    assert best.tags[checkpoint_models.PATH_TAG] == "/ray/run/checkpoint_x"
    metrics = {m.key: m for m in best.metrics}
    assert metrics["holdout_map"].value == 55.5 and metrics["holdout_map"].step == 2
    assert (metrics["holdout_map"].dataset_name, metrics["holdout_map"].dataset_digest) == (
        holdout.name,
        holdout.digest,
    )
    assert "train_loss" not in metrics  # run-level metrics stay the run's
    files = [f.path for f in client.list_logged_model_artifacts(best.model_id)]
    assert files == [checkpoint_models.POINTER_FILE]
    pointer = Path(best.artifact_location.removeprefix("file://")) / checkpoint_models.POINTER_FILE
    assert json.loads(pointer.read_text()) == {"epoch": 2}
    # the run's history is whole: linked metrics are run metrics too
    assert [m.step for m in client.get_metric_history(recorder.run_id, "holdout_map")] == [1, 2, 3]
    outputs = client.get_run(recorder.run_id).outputs.model_outputs
    assert sorted(o.step for o in outputs) == [1, 2, 3]

    # a resumed run (a new attempt continuing the same MLflow run) finds its models instead of adding more
    again = _open(cfg, run_id=recorder.run_id)
    try:
        assert checkpoint_models.log_checkpoint_model(again, 2, {"epoch": 2}) == ids[2]
        assert not again.log_metrics({"train_loss": 0.5}, 2, linked={"holdout_map": 1.0}, model_id=ids[2])
    finally:
        again.finish()
    names = [m.name for m in client.search_logged_models([recorder.experiment_id])]
    assert sorted(names) == ["checkpoint-epoch-001", "checkpoint-epoch-002", "checkpoint-epoch-003"]


def test_a_pending_checkpoint_model_left_by_a_dead_attempt_is_replaced(cfg):
    recorder = _open(cfg)
    try:
        leftover = recorder.client.create_logged_model(
            recorder.experiment_id, name=checkpoint_models.model_name(1), source_run_id=recorder.run_id
        )
        model_id = checkpoint_models.log_checkpoint_model(recorder, 1, {"epoch": 1})
    finally:
        recorder.finish()
    assert model_id != leftover.model_id
    (ready,) = recorder.find_models(checkpoint_models.model_name(1))
    assert ready.model_id == model_id


@pytest.mark.slow  # samples for seconds
def test_system_metrics_are_logged_into_the_run_and_continue_on_resume(cfg, monkeypatch):
    monkeypatch.setattr(system_metrics, "SAMPLING_INTERVAL_S", 0.2)
    recorder = _open(cfg)
    recorder.start_system_metrics()
    time.sleep(1.5)
    recorder.finish()
    client = recorder.client
    keys = set(client.get_run(recorder.run_id).data.metrics)
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_percentage", "system/network_receive_megabytes"):  # fmt: skip
        assert key in keys, key
    cpu = "system/cpu_utilization_percentage"
    first = [m.step for m in client.get_metric_history(recorder.run_id, cpu)]
    assert first == list(range(1, len(first) + 1)) and first  # step 0 is the packaged model's (log_model)

    again = _open(cfg, run_id=recorder.run_id)  # a resumed attempt continues the steps
    again.start_system_metrics()
    time.sleep(1.0)
    again.finish()
    steps = [m.step for m in client.get_metric_history(recorder.run_id, cpu)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > len(first)

    node = _open(cfg, run_id=recorder.run_id)
    node.start_system_metrics("node_0")
    time.sleep(1.0)
    node.finish()
    assert client.get_metric_history(recorder.run_id, "system/node_0/cpu_utilization_percentage")


def test_system_metrics_can_be_turned_off(cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert system_metrics.start("no-such-run", tracking.tracking_uri(cfg)) is None
    system_metrics.stop(None)  # nothing to stop: no error
    assert system_metrics.shared_store("http://mlflow:5000") and system_metrics.shared_store(
        "postgresql://h/db"
    )
    assert not system_metrics.shared_store(tracking.tracking_uri(cfg))
