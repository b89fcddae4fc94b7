"""``q2l promote``: gate, aliases, tags, evaluation runs, rollback and refusals, on a real SQLite registry.

Better and worse candidates are made deterministically without training: the test split's labels are the
"teacher" model's own ranking (per class, the images above its median probability are positive), so the
teacher scores mAP 100 exactly, while independently initialised models score far less. The data set's
category ids put the labels in another order than the models' outputs, so a wrong column order would show.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import coco_doc, write_jpeg
from model_fixtures import tiny_model
from support import mlflow_uri

from q2l.config import Config, config_from_dict
from q2l.metrics import summarize
from q2l.packaging import Predictor, log_model, model_spec
from q2l.registry.evaluate import evaluate, label_order
from q2l.registry.predict import run_predict
from q2l.registry.promote import CHAMPION, PREVIOUS, TAG, gate, run_promote
from q2l.registry.writes import PENDING_TAG
from q2l.tracking import tracking_uri
from q2l.tracking.store import PROGRESS_BAR_ENV

LABELS = ["apple", "bike", "cat", "dog"]  # the models' output order
CATEGORIES = [(10, "apple"), (8, "bike"), (3, "cat"), (1, "dog")]  # the data's order is by id: dog, cat, ...
SIZE = 64
NUM_TEST = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data labelled by the teacher, a SQLite store, and logged models: returns (cfg, model URIs)."""
    import mlflow

    from q2l.tracking import ensure_experiment

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("promote")
    root = tmp / "data"
    teacher = tiny_model(0, len(LABELS))
    test_names = [f"t{k:02d}.jpg" for k in range(NUM_TEST)]
    paths = [
        write_jpeg(root / "val2014" / n, seed=100 + k, h=48 + k, w=64 - k) for k, n in enumerate(test_names)
    ]
    probs, failures = Predictor(teacher, model_spec(teacher, LABELS, SIZE), "cpu").predict_paths(paths)
    assert not failures
    positive = probs > np.median(probs, axis=0, keepdims=True)
    cat_id = dict((n, c) for c, n in CATEGORIES)
    test = [(n, [cat_id[LABELS[j]] for j in np.flatnonzero(positive[i])]) for i, n in enumerate(test_names)]
    train = [(f"r{k}.jpg", [CATEGORIES[k % 4][0]]) for k in range(8)]
    for k, (n, _) in enumerate(train):
        write_jpeg(root / "train2014" / n, seed=k)
    (root / "annotations").mkdir()
    for split, images in (("train", train), ("val", test)):
        doc = coco_doc(images, CATEGORIES)
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(doc))

    cfg = config_from_dict(
        {
            "data": {"root": str(root), "image_size": SIZE, "num_workers": 0, "holdout_fraction": 0.25},
            "mlflow": {"results_dir": str(tmp / "results"), "experiment": "q2l-test"},
            "promote": {"min_map": 10.0},
        }
    )
    models = {
        "teacher": (teacher, LABELS),
        "teacher_copy": (tiny_model(0, len(LABELS)), LABELS),
        "random1": (tiny_model(1, len(LABELS)), LABELS),
        "random2": (tiny_model(2, len(LABELS)), LABELS),
        "renamed": (tiny_model(0, len(LABELS)), ["apple", "bike", "cat", "zebra"]),
    }
    with mlflow_uri(tracking_uri(cfg)):
        uris = {}
        with mlflow.start_run(experiment_id=ensure_experiment(cfg), run_name="candidates"):
            for name, (model, labels) in models.items():
                uris[name] = log_model(model, label_names=labels, image_size=SIZE, name=name).model_uri
        yield cfg, uris


def client(cfg: Config):
    from q2l import tracking

    return tracking.client(cfg)


def register(cfg: Config, name: str, uri: str) -> str:
    c = client(cfg)
    try:
        c.get_registered_model(name)
    except Exception:  # noqa: BLE001 - first version of this name
        c.create_registered_model(name)
    return str(c.create_model_version(name, source=uri).version)


def aliases(cfg: Config, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client(cfg).get_registered_model(name).aliases.items()}


def promotion_runs(cfg: Config) -> list:
    c = client(cfg)
    exp = c.get_experiment_by_name("q2l-test-promotions")
    return [] if exp is None else c.search_runs([exp.experiment_id])


@pytest.fixture
def run(capsys):
    """``run(cfg, model, **kwargs)``: ``run_promote``'s exit code, its progress lines (stdout), its errors."""

    def call(cfg: Config, model: str, **kwargs) -> tuple[int, str, str]:
        capsys.readouterr()
        err: list[str] = []
        code = run_promote(cfg, model, error=err.append, **kwargs)
        return code, capsys.readouterr().out, "\n".join(err)

    return call


@pytest.mark.slow
def test_evaluation_uses_training_preprocessing_and_data_label_order(world):
    cfg, uris = world
    from q2l.packaging import load_predictor

    teacher = load_predictor(uris["teacher"], device="cpu")
    assert evaluate(teacher, cfg.data).map == pytest.approx(100.0)
    assert evaluate(load_predictor(uris["random1"], device="cpu"), cfg.data).map < 90.0
    assert label_order(["a", "b", "c"], ["c", "a", "b"], "m", "d").tolist() == [2, 0, 1]


@pytest.mark.slow
def test_floor_then_better_promoted_worse_refused(world, tmp_path, run, monkeypatch):
    cfg, uris = world
    monkeypatch.delenv(PROGRESS_BAR_ENV, raising=False)
    name = "story"
    v1 = register(cfg, name, uris["random1"])
    v2 = register(cfg, name, uris["teacher"])
    v3 = register(cfg, name, uris["random2"])
    c = client(cfg)
    c.set_registered_model_alias(name, "challenger", v1)
    runs_before = len(promotion_runs(cfg))

    # no champion: the floor alone decides
    code, out, _ = run(cfg.replace({"promote.min_map": 99.0}), name)
    assert code == 1 and "[FAIL] floor" in out and CHAMPION not in aliases(cfg, name)
    code, out, _ = run(cfg, name)
    assert code == 0 and "no champion (floor only)" in out
    assert aliases(cfg, name) == {"challenger": v1, CHAMPION: v1}
    tags = c.get_model_version(name, v1).tags
    assert tags[TAG + "gate"] == "passed" and tags[TAG + "replaced"] == ""
    assert tags[TAG + "split"] == "test" and len(tags[TAG + "data_fingerprint"]) == 16
    assert "promoted to champion" in c.get_model_version(name, v1).description
    # the evaluation's input is the test split as training logs it: the same MLflow dataset entity
    from q2l.data import build_datasets
    from q2l.tracking.datasets import image_split

    splits = build_datasets(cfg.data, train=True)
    trained = image_split("test", splits.test, splits.label_names, splits.fingerprint, cfg.data.root)
    (evaluation,) = [r for r in promotion_runs(cfg) if r.data.tags["q2l.candidate_version"] == v1][-1:]
    (used,) = c.get_run(evaluation.info.run_id).inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest) == (trained.name, trained.digest)

    # a dry run of a better candidate changes nothing
    c.set_registered_model_alias(name, "challenger", v2)
    code, out, _ = run(cfg, name, dry_run=True)
    assert code == 0 and "would be promoted" in out
    assert aliases(cfg, name)[CHAMPION] == v1 and TAG + "gate" not in c.get_model_version(name, v2).tags

    # the better candidate is promoted; the old champion becomes previous-champion
    code, out, _ = run(cfg, name)
    assert code == 0, out
    assert aliases(cfg, name) == {"challenger": v2, CHAMPION: v2, PREVIOUS: v1}
    tags = c.get_model_version(name, v2).tags
    assert float(tags[TAG + "candidate_map"]) == pytest.approx(100.0)
    assert float(tags[TAG + "champion_map"]) < 90.0 and tags[TAG + "replaced"] == v1
    assert "q2l.demoted" in c.get_model_version(name, v1).tags
    assert f"v{v2}" in out and f"v{v1}" in out and "largest per-class AP changes" in out

    # a worse candidate is refused with exit 1 and nothing in the registry changes
    before = {
        v: (c.get_model_version(name, v).tags, c.get_model_version(name, v).description) for v in (v1, v2, v3)
    }
    code, out, _ = run(cfg, name, candidate=v3)
    assert code == 1 and "[FAIL] delta" in out and "REFUSED" in out
    assert aliases(cfg, name) == {"challenger": v2, CHAMPION: v2, PREVIOUS: v1}
    after = {
        v: (c.get_model_version(name, v).tags, c.get_model_version(name, v).description) for v in (v1, v2, v3)
    }
    assert after == before

    # every real (non-dry) evaluation left a run with the table; the refused one says so
    runs = promotion_runs(cfg)
    assert len(runs) - runs_before == 4
    latest = max(runs, key=lambda r: r.info.start_time)
    assert latest.data.tags["q2l.gate"] == "refused" and latest.data.tags["q2l.candidate_version"] == v3
    table = Path(latest.info.artifact_uri.removeprefix("file://"), "comparison.txt").read_text()
    assert "mAP" in table and "CF1" in table and "OF1" in table

    # the served alias is what `q2l predict` uses
    out_buf, err_buf = io.StringIO(), io.StringIO()
    image = next((Path(cfg.data.root) / "val2014").iterdir())
    store = tracking_uri(cfg)
    uri = f"models:/{name}@{CHAMPION}"
    assert run_predict(uri, [image], fmt="json", tracking_uri=store, out=out_buf, err=err_buf) == 0
    assert set(json.loads(out_buf.getvalue())["predictions"][0]["probabilities"]) == set(LABELS)
    # promote and predict quiet MLflow's progress bars only while they download: nothing leaks out
    assert PROGRESS_BAR_ENV not in os.environ


@pytest.mark.slow
def test_rollback_walks_back_through_promotions(world, run):
    cfg, uris = world
    name = "rollback"
    versions = [register(cfg, name, uris[k]) for k in ("random1", "teacher", "teacher_copy")]
    for v in versions:
        assert run(cfg, name, candidate=v)[0] == 0
    assert aliases(cfg, name) == {CHAMPION: versions[2], PREVIOUS: versions[1]}

    code, out, _ = run(cfg, name, rollback_=True)
    assert code == 0 and aliases(cfg, name) == {CHAMPION: versions[1], PREVIOUS: versions[0]}
    assert "q2l.rolled_back" in client(cfg).get_model_version(name, versions[2]).tags
    code, out, _ = run(cfg, name, rollback_=True)
    assert code == 0 and aliases(cfg, name) == {CHAMPION: versions[0]}
    code, _, err = run(cfg, name, rollback_=True)
    assert code == 2 and "nothing to roll back to" in err
    assert aliases(cfg, name) == {CHAMPION: versions[0]}


@pytest.mark.slow
def test_label_set_mismatch_is_refused_and_changes_nothing(world, run):
    cfg, uris = world
    name = "mismatch"
    v1 = register(cfg, name, uris["teacher"])
    v2 = register(cfg, name, uris["renamed"])
    assert run(cfg, name, candidate=v1)[0] == 0
    runs_before = len(promotion_runs(cfg))
    code, _, err = run(cfg, name, candidate=v2)
    assert code == 1 and "label sets differ" in err and "zebra" in err and "champion" in err
    assert aliases(cfg, name) == {CHAMPION: v1} and len(promotion_runs(cfg)) == runs_before

    # without a champion, the evaluation data's label set is the reference
    v = register(cfg, "mismatch-data", uris["renamed"])
    code, _, err = run(cfg, "mismatch-data", candidate=v)
    assert code == 1 and "the evaluation data" in err and "dog" in err
    assert aliases(cfg, "mismatch-data") == {}


@pytest.mark.slow
def test_usage_errors_exit_2(world, tmp_path, run):
    cfg, uris = world
    name = "usage"
    v1 = register(cfg, name, uris["teacher"])
    cases = [
        ("nope", {}, "unknown registered model 'nope'"),
        (name, {"candidate": "99"}, "no version 99"),
        (name, {"candidate": "@challenger"}, "no alias '@challenger'"),
        (name, {"candidate": "latest"}, "expected a version number or @alias"),
        (name, {"rollback_": True, "candidate": v1}, "--rollback takes"),
        (name, {"rollback_": True}, "no @champion"),
    ]
    for model, kwargs, message in cases:
        code, _, err = run(cfg, model, **kwargs)
        assert code == 2 and message in err, (model, kwargs, err)
    missing = cfg.replace({"data.root": str(tmp_path / "no-data")})
    code, _, err = run(missing, name, candidate=v1)
    assert code == 2 and "evaluation data set unavailable" in err and "no-data" in err
    no_store = cfg.replace({"mlflow.results_dir": str(tmp_path / "elsewhere")})
    code, _, err = run(no_store, name, candidate=v1)
    assert code == 2 and "no MLflow store" in err
    assert aliases(cfg, name) == {}


def test_gate_rules():
    """Floor, delta and per-class drop, on summaries of real scores."""
    from q2l.config import PromoteConfig

    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float32)
    perfect = targets * 0.8 + 0.1
    # class 0 ranked badly, class 1 perfectly
    mixed = torch.stack([torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7]), perfect[:, 1]], 1)
    champ, cand = summarize(mixed, targets, top_k=1), summarize(perfect, targets, top_k=1)
    names = ["a", "b"]
    assert all(c.passed for c in gate(cand, champ, PromoteConfig(min_map=50, min_delta=5), names))
    # the reverse: the candidate loses class 0 by > 50 AP points
    checks = {c.name: c for c in gate(champ, cand, PromoteConfig(max_class_drop=10, min_delta=-100), names)}
    assert checks["floor"].passed and checks["delta"].passed and not checks["class_drop"].passed
    assert "(a)" in checks["class_drop"].detail
    assert [c.name for c in gate(cand, None, PromoteConfig(min_map=101 - 1), names)] == ["floor"]


class Killed(Exception):
    """Stands for the process dying between two registry writes."""


def fail_after_first_alias_write(monkeypatch) -> list:
    """Make the MLflow client's alias writes (set, delete) raise ``Killed`` once one has gone through."""
    from mlflow import MlflowClient

    real_set = MlflowClient.set_registered_model_alias
    real_delete = MlflowClient.delete_registered_model_alias
    done: list = []

    def set_alias(self, name, alias, version):
        if done:
            raise Killed(f"killed before moving @{alias}")
        real_set(self, name, alias, version)
        done.append((alias, str(version)))

    def delete_alias(self, name, alias):
        if done:
            raise Killed(f"killed before deleting @{alias}")
        real_delete(self, name, alias)
        done.append((alias, None))

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias)
    monkeypatch.setattr(MlflowClient, "delete_registered_model_alias", delete_alias)
    return done


@pytest.mark.slow
def test_interrupted_promotion_is_completed_by_the_next_command(world, run, monkeypatch):
    cfg, uris = world
    name = "interrupted"
    v1, v2 = register(cfg, name, uris["random1"]), register(cfg, name, uris["teacher"])
    assert run(cfg, name, candidate=v1)[0] == 0
    c = client(cfg)

    with monkeypatch.context() as m:
        written = fail_after_first_alias_write(m)
        with pytest.raises(Killed):
            run(cfg, name, candidate=v2)
    # previous-champion moved first; the champion is still served, the record of the writes is there
    assert written == [(PREVIOUS, v1)]
    assert aliases(cfg, name) == {CHAMPION: v1, PREVIOUS: v1}
    assert PENDING_TAG in c.get_registered_model(name).tags
    assert c.get_model_version(name, v2).tags[TAG + "replaced"] == v1

    # a dry run reports it and changes nothing; the same command again completes it
    code, out, _ = run(cfg, name, candidate=v2, dry_run=True)
    assert code == 0 and "interrupted promotion or rollback" in out
    assert aliases(cfg, name) == {CHAMPION: v1, PREVIOUS: v1}
    code, out, _ = run(cfg, name, candidate=v2)
    assert code == 0 and "completing the interrupted promotion" in out and "already @champion" in out
    assert aliases(cfg, name) == {CHAMPION: v2, PREVIOUS: v1}
    assert PENDING_TAG not in c.get_registered_model(name).tags
    assert c.get_model_version(name, v2).description.count("promoted to champion") == 1
    assert "q2l.demoted" in c.get_model_version(name, v1).tags

    # an interrupted rollback: @champion moved back, previous-champion not yet removed
    with monkeypatch.context() as m:
        written = fail_after_first_alias_write(m)
        with pytest.raises(Killed):
            run(cfg, name, rollback_=True)
    assert written == [(CHAMPION, v1)] and aliases(cfg, name) == {CHAMPION: v1, PREVIOUS: v1}
    code, out, _ = run(cfg, name, rollback_=True)
    assert code == 0 and "completing the interrupted rollback" in out
    # completed, not rolled back a second time
    assert aliases(cfg, name) == {CHAMPION: v1}
    assert PENDING_TAG not in c.get_registered_model(name).tags
    assert "q2l.rolled_back" in c.get_model_version(name, v2).tags


@pytest.mark.slow
def test_evaluation_images_over_the_pixel_budget_stop_promotion(world, run):
    cfg, uris = world
    name = "budget"
    v1 = register(cfg, name, uris["teacher"])
    code, _, err = run(cfg.replace({"data.max_image_pixels": 1000}), name, candidate=v1)
    assert code == 2 and "exceeds the limit of 1000 (data.max_image_pixels)" in err
    assert aliases(cfg, name) == {}
