"""Fast tests of the sweep's pure parts: the YAML search space, the resource plan, the leaderboard, naming.

No Ray and no training here (tests/test_tune.py runs real sweeps).
"""

from __future__ import annotations

import math
import pickle

import optuna
import pytest

from q2l.config import Config, ConfigError
from q2l.ray_runtime import error_line
from q2l.sweep.leaderboard import COMPLETED, FAILED, STOPPED, TrialRow, format_markdown, leaderboard
from q2l.sweep.plots import write_plots
from q2l.sweep.record import registered_model_name
from q2l.sweep.resources import plan_resources
from q2l.sweep.search import scheduler as _scheduler
from q2l.sweep.space import parse_space
from q2l.sweep.storage import resolve_sweep, write_state

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "model.backbone": {"choice": ["tf_efficientnet_lite0", "resnet18"]},
    "model.hidden_dim": {
        "when": "model.backbone",
        "cases": {"resnet18": {"choice": [128, 256]}, "tf_efficientnet_lite0": 192},
    },
    "loss.gamma_neg": {"uniform": [0, 4]},
    "loss.gamma_pos": {"uniform": [0, 1], "step": 0.5},
    "optim.lr": {"loguniform": ["1e-5", "1e-3"]},  # YAML 1.1 reads 1e-5 as a string
    "train.batch_size": {"int": [8, 32], "step": 8},
}


def with_space(space, **keys) -> Config:
    return Config().replace({"tune.space": space, **keys})


def sample(space_obj, seed: int, n: int) -> list[dict]:
    """Draw ``n`` configs the way Ray's OptunaSearch does (ask, run the define-by-run function)."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        fixed = space_obj(trial)
        out.append({**trial.params, **(fixed or {})})
        study.tell(trial, 0.0)
    return out


def test_space_samples_every_kind_and_maps_back_to_config_keys():
    space = parse_space(with_space(SPACE))
    assert space.keys == list(SPACE)
    configs = sample(space, seed=0, n=40)
    backbones = set()
    for sampled in configs:
        ov = space.overrides(sampled)
        assert set(ov) == set(SPACE)
        backbones.add(ov["model.backbone"])
        # the conditional width follows the backbone
        expected = {192} if ov["model.backbone"] == "tf_efficientnet_lite0" else {128, 256}
        assert ov["model.hidden_dim"] in expected
        assert 0 <= ov["loss.gamma_neg"] <= 4
        assert ov["loss.gamma_pos"] in (0.0, 0.5, 1.0)
        assert 1e-5 <= ov["optim.lr"] <= 1e-3
        assert ov["train.batch_size"] in (8, 16, 24, 32)
        # a sampled config is a valid run config, and the distributions match what was drawn
        Config().replace(ov)
        dists = space.distributions(sampled)
        assert set(dists) <= set(sampled)
        assert "model.hidden_dim|tf_efficientnet_lite0" not in dists  # a fixed case is not a distribution
    assert backbones == {"tf_efficientnet_lite0", "resnet18"}
    # seeded: the same seed draws the same configs; the object survives pickling (Tune checkpoints it)
    again = pickle.loads(pickle.dumps(space))
    assert sample(again, seed=0, n=5) == configs[:5]
    assert sample(space, seed=1, n=5) != configs[:5]


def test_describe_round_trips_through_the_parser():
    space = parse_space(with_space(SPACE))
    assert parse_space(with_space(space.describe())).describe() == space.describe()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "tune.space: the search space is empty"),
        ({"model.hiden_dim": {"choice": [64]}}, "tune.space.model.hiden_dim: unknown config key"),
        ({"ray.num_workers": {"choice": [1, 2]}}, "tune.space.ray.num_workers: keys of the sections"),
        ({"optim.lr": [1e-4, 1e-3]}, "tune.space.optim.lr: a list is ambiguous"),
        ({"optim.lr": {"loguniform": [0, 1e-3]}}, "tune.space.optim.lr: a log-scale range needs low > 0"),
        ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, "tune.space.optim.lr: uniform low 0.001 is above high"),
        ({"optim.lr": {"uniform": ["fast", 1]}}, "tune.space.optim.lr.uniform: 'fast' is not a number"),
        ({"optim.lr": {"uniform": [0, 1], "log": True}}, "tune.space.optim.lr: unknown key(s) ['log']"),
        ({"optim.lr": {"normal": [0, 1]}}, "tune.space.optim.lr: expected exactly one of"),
        ({"model.hidden_dim": {"int": [60, 70]}}, "tune.space.model.hidden_dim: value 60 is invalid"),
        ({"train.epochs": {"uniform": [1, 3]}}, "tune.space.train.epochs: value 1.0 is invalid"),
        ({"model.backbone": {"choice": []}}, "tune.space.model.backbone: choice must be a non-empty list"),
        ({"loss.clip": 0.1}, "tune.space: every entry is a fixed value"),
        (
            {"model.hidden_dim": {"when": "model.backbone", "cases": {"resnet18": 64}}},
            "tune.space.model.hidden_dim.when: 'model.backbone' is not a parameter of this space",
        ),
        (
            {
                "model.backbone": {"choice": ["a", "b"]},
                "model.hidden_dim": {"when": "model.backbone", "cases": {"a": 64}},
            },
            "tune.space.model.hidden_dim.cases: no case for model.backbone = 'b'",
        ),
        (
            {
                "model.backbone": {"choice": ["a"]},
                "model.hidden_dim": {"when": "model.backbone", "cases": {"a": 64, "c": 32}},
            },
            "tune.space.model.hidden_dim.cases.c: not one of model.backbone's choices",
        ),
        (
            {
                "loss.gamma_neg": {"uniform": [0, 4]},
                "model.hidden_dim": {"when": "loss.gamma_neg", "cases": {"1": 64}},
            },
            "'loss.gamma_neg' must be an unconditional choice parameter",
        ),
        (
            {
                "model.backbone": {"choice": ["a"]},
                "model.hidden_dim": {"when": "model.backbone", "cases": {"a": {"int": [60, 64]}}},
            },
            "tune.space.model.hidden_dim.cases.a: value 60 is invalid",
        ),
    ],
)
def test_bad_spaces_name_the_key(space, message):
    with pytest.raises(ConfigError) as err:
        parse_space(with_space(space))
    assert message in str(err.value)


def test_case_keys_match_choices_written_as_other_types():
    # YAML reads `cases: {2: ...}` keys as ints while choices may be strings, and vice versa
    space = parse_space(
        with_space(
            {
                "model.num_heads": {"choice": [2, 4]},
                "model.hidden_dim": {
                    "when": "model.num_heads",
                    "cases": {"2": 64, 4: {"choice": [128, 256]}},
                },
            }
        )
    )
    for sampled in sample(space, seed=3, n=10):
        ov = space.overrides(sampled)
        assert (
            ov["model.hidden_dim"] == 64
            if ov["model.num_heads"] == 2
            else ov["model.hidden_dim"] in (128, 256)
        )


# ------------------------------------------------------------------------------------------ resources
def cfg_with(**keys) -> Config:
    return Config().replace({"tune.space": {"optim.lr": {"loguniform": [1e-5, 1e-3]}}, **keys})


@pytest.mark.parametrize(
    ("workers", "cpus", "samples", "asked", "fits", "concurrent"),
    [
        (2, 1.0, 8, None, 1, 1),  # 2 CPUs: one trial of 2 workers
        (1, 1.0, 8, None, 2, 2),  # 2 CPUs: two trials of 1 worker
        (1, 1.0, 1, None, 2, 1),  # never more than the number of trials
        (1, 1.0, 8, 1, 2, 1),  # the user's cap
        (1, 0.5, 8, None, 4, 4),
    ],
)
def test_plan_on_two_cpus_never_starves_workers(workers, cpus, samples, asked, fits, concurrent):
    cfg = cfg_with(
        **{
            "ray.num_workers": workers,
            "ray.cpus_per_worker": cpus,
            "tune.num_samples": samples,
            "tune.max_concurrent_trials": asked,
        }
    )
    plan = plan_resources(cfg, [{"CPU": 2.0, "memory": 8e9}])
    assert (plan.fits, plan.max_concurrent) == (fits, concurrent)
    # drivers hold no CPU: all of them stay for the workers
    assert plan.driver["CPU"] == 0.0 and plan.driver["memory"] > 0
    assert plan.max_concurrent * workers * cpus <= 2.0


def test_plan_counts_gpus_node_by_node_and_honours_trial_slots():
    cfg = cfg_with(
        **{"ray.num_workers": 2, "ray.use_gpu": True, "ray.cpus_per_worker": 4.0, "tune.num_samples": 16}
    )
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0}]  # a CPU-only head
    plan = plan_resources(cfg, nodes)
    assert plan.per_worker == {"CPU": 4.0, "GPU": 1.0}
    assert (plan.fits, plan.max_concurrent) == (4, 4)
    # 3 GPUs per node: 3 + 3 = 6 worker slots = 3 trials of 2 workers (a bundle never spans nodes)
    assert plan_resources(cfg, [{"CPU": 16.0, "GPU": 3.0}] * 2).fits == 3
    # an admin's trial_slot resource caps concurrency and carries the drivers
    slotted = plan_resources(cfg, [{**nodes[0], "trial_slot": 2.0}, nodes[1]])
    assert slotted.driver == {"CPU": 0.0, "trial_slot": 1.0}
    assert slotted.max_concurrent == 2
    lowered = plan_resources(cfg.replace({"tune.max_concurrent_trials": 10}), nodes)
    assert lowered.max_concurrent == 4 and "lowered to 4" in lowered.note


def test_plan_refuses_a_trial_that_cannot_fit():
    cfg = cfg_with(**{"ray.num_workers": 3})
    with pytest.raises(ConfigError, match="one trial needs ray.num_workers = 3 workers"):
        plan_resources(cfg, [{"CPU": 2.0}])
    with pytest.raises(ConfigError, match="GPU"):
        plan_resources(cfg_with(**{"ray.use_gpu": True, "ray.num_workers": 1}), [{"CPU": 64.0}])


def test_asha_needs_a_rung_before_the_last_epoch():
    with pytest.raises(ConfigError, match="tune.grace_period = 3 must be below train.epochs = 3"):
        _scheduler(cfg_with(**{"train.epochs": 3, "tune.grace_period": 3}))
    assert _scheduler(cfg_with(**{"tune.scheduler": "none"})) is None
    asha = _scheduler(cfg_with(**{"train.epochs": 4, "tune.grace_period": 1, "tune.reduction_factor": 2.0}))
    # rungs at epochs 1 and 2; none at the last epoch, so a surviving trial always finishes
    assert sorted(m for m, _ in asha._brackets[0]._rungs) == [1, 2]


# ------------------------------------------------------------------------------------------ naming
def test_sweep_names_and_registered_model_name(tmp_path):
    cfg = cfg_with(**{"ray.storage_path": str(tmp_path), "data.root": "data/demo"})
    assert registered_model_name(cfg) == "q2l-demo"
    assert registered_model_name(cfg.replace({"mlflow.registered_model": "mine"})) == "mine"
    assert registered_model_name(cfg.replace({"data.root": "/x/COCO 2014/"})) == "q2l-coco-2014"
    with pytest.raises(ConfigError, match="--resume: no sweep named sweep-demo-"):
        resolve_sweep(cfg, resume=True)
    name, path = resolve_sweep(cfg, resume=False)
    assert name.startswith("sweep-demo-") and path == f"{tmp_path}/{name}"
    write_state(path, {"name": name})
    write_state(f"{tmp_path}/sweep-demo-00000000-000000", {"name": "older"})
    assert resolve_sweep(cfg, resume=True) == (name, path)  # the latest one
    named = cfg.replace({"tune.name": name})
    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        resolve_sweep(named, resume=False)


# ------------------------------------------------------------------------------------------ leaderboard
def rows() -> list[TrialRow]:
    base = Config().flat()
    return [
        TrialRow(
            "aaa", STOPPED, {}, {**base, "loss.gamma_neg": 1.5}, 40.0, math.nan, 1, [40.0], "r1", order=0
        ),
        TrialRow(
            "bbb",
            COMPLETED,
            {},
            {**base, "loss.gamma_neg": 3.0},
            55.5,
            50.1,
            3,
            [30, 50, 55.5],
            "r2",
            order=1,
        ),
        TrialRow(
            "ccc",
            FAILED,
            {},
            {**base, "model.backbone": "nope", "loss.gamma_neg": 9.0},
            error="ValueError: bad | x",
            order=2,
        ),
        TrialRow(
            "ddd", COMPLETED, {}, {**base, "loss.gamma_neg": 0.5}, 45.0, 41.0, 3, [20, 40, 45], "r4", order=3
        ),
    ]


def test_leaderboard_ranks_by_held_out_map_with_failures_last():
    header, body = leaderboard(rows(), ["loss.gamma_neg", "train.batch_size"])
    col = {h: i for i, h in enumerate(header)}
    assert [r[col["trial"]] for r in body] == ["bbb", "ddd", "aaa", "ccc"]
    assert "train.batch_size" in header and header.count("gamma_neg") == 1
    assert body[0][col["test_map"]] == "50.1" and body[2][col["test_map"]] == "-"
    assert body[2][col["status"]] == "stopped by ASHA"
    assert body[3][col["status"]] == "failed: ValueError: bad | x"
    md = format_markdown(header, body)
    assert "bad \\| x" in md and md.count("\n") == 6


def test_error_line_picks_the_exception_line():
    text = (
        "Traceback (most recent call last):\n  File x\n    raise ValueError(...)\nValueError: no such model\n"
    )
    assert error_line(text) == "ValueError: no such model"
    wrapped = (
        "ray::driver()\nq2l.sweep.trial.TrialSetupError: model.backbone: 'nope' is not a timm model name\n\n"
    )
    assert error_line(wrapped).startswith("q2l.sweep.trial.TrialSetupError: model.backbone: 'nope'")


def test_optuna_plots_are_written(tmp_path):
    files, notes = write_plots(rows(), ["loss.gamma_neg", "model.backbone"], tmp_path)
    names = sorted(p.stem for p in files)
    assert names == [
        "intermediate_values",
        "optimization_history",
        "parallel_coordinate",
        "param_importances",
    ]
    assert all(p.stat().st_size > 5000 for p in files)
    assert notes == []


def test_child_runs_are_finished_tagged_and_created_for_early_failures(tmp_path, mlflow_store):
    """The sweep's bookkeeping on a real (SQLite) MLflow store (a copy of a migrated one), without Ray."""
    from mlflow import MlflowClient

    from q2l.sweep.record import finish_child_runs
    from q2l.tracking import ensure_experiment, tracking_uri

    cfg = Config().replace({"mlflow.results_dir": str(tmp_path / "results"), "mlflow.experiment": "t"})
    assert tracking_uri(cfg) == mlflow_store
    client = MlflowClient(tracking_uri(cfg))
    exp = ensure_experiment(cfg)
    parent = client.create_run(exp, run_name="sweep").info.run_id

    def child(trial: str) -> str:
        tags = {"mlflow.parentRunId": parent, "q2l.trial_id": trial}
        return client.create_run(exp, tags=tags).info.run_id

    done, stopped, orphan, restarted = child("done"), child("stopped"), child("again"), child("again")
    lost, lost_done = child("lost"), child("lost-done")  # trials Tune lost with a killed driver
    client.set_terminated(lost_done, "FINISHED")
    client.set_terminated(done, "FINISHED")  # the train layer ended it
    base = Config().flat()
    trial_rows = [
        TrialRow("done", COMPLETED, {}, base, 50.0, 40.0, 3, run_id=done),
        TrialRow("stopped", STOPPED, {}, base, 30.0, math.nan, 1, run_id=stopped),  # ASHA killed its workers
        TrialRow("again", COMPLETED, {}, base, 45.0, 41.0, 3, run_id=restarted),  # restarted: a new run
        TrialRow("early", FAILED, {}, {**base, "model.backbone": "nope"}, error="ValueError: nope"),
    ]
    finish_child_runs(cfg, trial_rows, parent, "sweep")

    def run(run_id):
        return client.get_run(run_id)

    assert run(done).info.status == "FINISHED" and run(done).data.tags["q2l.trial_status"] == "completed"
    assert run(stopped).info.status == "FINISHED" and run(stopped).data.tags["q2l.stopped_by_asha"] == "true"
    assert run(orphan).info.status == "KILLED"  # the attempt that the trial's reported run replaced
    assert run(restarted).info.status == "FINISHED"
    assert run(lost).info.status == "KILLED" and run(lost_done).info.status == "FINISHED"
    early = run(trial_rows[3].run_id)  # created for the trial that failed before the train layer ran
    assert early.info.status == "FAILED" and early.data.tags["q2l.error"] == "ValueError: nope"
    assert early.data.tags["mlflow.parentRunId"] == parent and early.data.params["model.backbone"] == "nope"


def test_relative_paths_are_refused_inside_a_ray_job_with_a_working_dir(monkeypatch):
    import json

    from q2l.sweep.storage import check_job_paths as _check_job_paths

    cfg = cfg_with(
        **{"data.root": "data/demo", "ray.storage_path": "/abs/ray", "mlflow.results_dir": "/abs/r"}
    )
    _check_job_paths(cfg)  # not in a job: fine
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    with pytest.raises(
        ConfigError, match=r"data.root = 'data/demo' is relative.*--set data.root=\$PWD/data/demo"
    ):
        _check_job_paths(cfg)
    _check_job_paths(cfg.replace({"data.root": "/abs/data"}))
    with pytest.raises(ConfigError, match="mlflow.results_dir"):
        _check_job_paths(cfg.replace({"data.root": "/abs/data", "mlflow.results_dir": "results"}))
    # with a tracking server and a study database elsewhere the results folder is not used
    server = {"data.root": "/abs/data", "mlflow.results_dir": "results", "mlflow.tracking_uri": "http://h"}
    with pytest.raises(ConfigError, match="mlflow.results_dir"):  # the Optuna study would go there
        _check_job_paths(cfg.replace(server))
    _check_job_paths(cfg.replace({**server, "tune.storage": "postgresql+psycopg2://db/q2l_optuna"}))


def test_sweep_paths_keep_a_uri_query_at_the_end():
    from q2l.sweep.storage import join as _join
    from q2l.sweep.storage import storage_root

    uri = "s3://bucket/ray/?endpoint_override=127.0.0.1:9000&scheme=http"
    cfg = cfg_with(**{"ray.storage_path": uri})
    assert storage_root(cfg) == "s3://bucket/ray?endpoint_override=127.0.0.1:9000&scheme=http"
    assert _join(storage_root(cfg), "sweep-x", "trials") == (
        "s3://bucket/ray/sweep-x/trials?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert _join("/abs/ray/", "s") == "/abs/ray/s"
