"""The training engine on a real (tiny) Query2Label and an in-memory set of coloured squares.

Class k is present in an image exactly when a square of colour k is pasted on it, so one epoch of training
measurably lowers the loss. Everything runs on CPU with one thread; the DDP test runs two real gloo processes.
"""

from __future__ import annotations

import functools
import math
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from support import HANG_GUARD_S, free_port
from torch.utils.data import Dataset

from q2l.config import config_from_dict
from q2l.data.loaders import build_loader
from q2l.engine import (
    Engine,
    NonFiniteLossError,
    all_reduce_sum,
    better_source,
    broadcast_object,
    build_ema,
    cpu_bf16_supported,
    derive_seed,
    gather_predictions,
    load_checkpoint,
    no_decay_names,
    resolve_precision,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from q2l.engine.optim import build_scheduler
from q2l.losses import build_loss
from q2l.models import build_model

torch.set_num_threads(1)

COLOURS = torch.tensor([[230, 40, 40], [40, 200, 60], [50, 80, 230], [240, 220, 50]], dtype=torch.uint8)
SIZE = 64
BATCH = 8


class Squares(Dataset):
    """``n`` images of grey noise with a square of colour k per present class k; ``bad`` items are None."""

    def __init__(self, n: int, seed: int = 0, bad: tuple[int, ...] = ()):
        g = torch.Generator().manual_seed(seed)
        k = len(COLOURS)
        self.targets = (torch.rand(n, k, generator=g) < 0.4).float()
        for i in torch.nonzero(self.targets.sum(1) == 0).flatten().tolist():
            self.targets[i, int(torch.randint(k, (1,), generator=g))] = 1.0
        self.images = torch.randint(80, 150, (n, 3, SIZE, SIZE), generator=g).to(torch.uint8)
        side = SIZE // 4
        for i in range(n):
            for c in torch.nonzero(self.targets[i]).flatten().tolist():
                y, x = torch.randint(0, SIZE - side, (2,), generator=g).tolist()
                self.images[i, :, y : y + side, x : x + side] = COLOURS[c].view(3, 1, 1)
        self.bad = set(bad)
        self.label_names = ["red", "green", "blue", "yellow"]
        self.image_size = SIZE

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key  # the loader's sampler passes (index, seed)
        if index in self.bad:
            return None
        return self.images[index], self.targets[index], index


def make_cfg(**overrides):
    """A small config: test_resnet backbone, hidden 32, fp32 unless overridden (dotted keys)."""
    raw = {
        "model": {"backbone": "test_resnet", "pretrained": False, "hidden_dim": 32, "num_heads": 4},
        "train": {"epochs": 2, "batch_size": BATCH, "precision": "fp32", "ema_decay": 0.9997, "seed": 0},
        "optim": {"lr": 3e-3, "weight_decay": 1e-2, "pct_start": 0.2},
        "loss": {"gamma_neg": 2.0, "gamma_pos": 0.0, "clip": 0.0},
        "data": {"num_workers": 0, "image_size": SIZE},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw, "test_engine")


def make_engine(cfg, steps_per_epoch: int, seed: int = 0, loss_fn=None) -> Engine:
    seed_everything(seed)
    model = build_model(cfg.model, num_classes=len(COLOURS))
    return Engine(model, loss_fn or build_loss(cfg.loss), cfg, steps_per_epoch, "cpu")


def loader(ds, cfg, train: bool, rank: int = 0, world_size: int = 1):
    return build_loader(ds, cfg.data, BATCH, train=train, seed=0, rank=rank, world_size=world_size)


def mean_loss(engine: Engine, data_loader, ema: bool = False) -> float:
    """The training loss (ASL) per image of the engine's eval-mode predictions over the whole loader."""
    p = engine.predict(data_loader, ema=ema)
    logits = torch.logit(p.scores.double(), eps=1e-6)
    return float(engine.loss_fn(logits, p.targets.double())) / len(p.scores)


@pytest.fixture(scope="module")
def squares():
    return Squares(64, bad=(5, 17))


def test_one_epoch_lowers_the_loss_and_counts_skipped_images():
    # 32 steps: enough for the eval-mode loss to drop (BatchNorm running statistics lag a shorter run)
    squares = Squares(256, bad=(5, 17))
    cfg = make_cfg(**{"train.epochs": 1})
    train_loader = loader(squares, cfg, train=True)
    eval_loader = loader(squares, cfg, train=False)
    engine = make_engine(cfg, len(train_loader))
    before = mean_loss(engine, eval_loader)
    stats = engine.train_one_epoch(train_loader, 0)
    after = mean_loss(engine, eval_loader)
    assert after < 0.7 * before, (before, after)
    assert stats["skipped_images"] == 2  # the two None items the collate dropped
    assert stats["images"] == 256 - 2
    assert stats["optimizer_steps"] == len(train_loader) == 32
    assert math.isfinite(stats["loss"]) and stats["images_per_s"] > 0 and stats["steady_images_per_s"] > 0
    # the schedule ran its whole cycle: the last lr used is near the final min lr (max_lr / 25 / 1e4)
    assert engine.scheduler.last_epoch == engine.scheduler.total_steps == 32
    assert stats["lr"] < 3e-3 / 10
    # EMA with warmed-up decay: it follows the model (its loss dropped too) but is not equal to it
    assert engine.global_step == 32  # the EMA's warm-up position
    assert mean_loss(engine, eval_loader, ema=True) < before
    ema_w = dict(engine.ema.module.named_parameters())
    assert any(not torch.equal(p, ema_w[n]) for n, p in engine.model.named_parameters())


def test_progress_hook_and_predict_order(squares):
    cfg = make_cfg(**{"train.epochs": 1, "train.ema_decay": None})
    train_loader = loader(squares, cfg, train=True)
    events = []
    engine = make_engine(cfg, len(train_loader))
    engine.progress = events.append
    engine.train_one_epoch(train_loader, 0)
    assert [e["step"] for e in events] == list(range(len(train_loader)))
    assert all(set(e) == {"epoch", "step", "steps", "loss", "lr", "images"} for e in events)
    p = engine.predict(loader(squares, cfg, train=False))
    kept = [i for i in range(len(squares)) if i not in squares.bad]
    assert p.indices.tolist() == kept
    assert p.scores.dtype == torch.float32 and ((p.scores >= 0) & (p.scores <= 1)).all()
    assert torch.equal(p.targets, squares.targets[kept])
    with pytest.raises(ValueError, match="EMA is off"):
        engine.predict(loader(squares, cfg, train=False), ema=True)


def _batch(ds, start: int):
    return ds.images[start : start + BATCH], ds.targets[start : start + BATCH]


def test_checkpoint_resume_gives_identical_next_step(squares, tmp_path):
    # dropout 0.1 is active in the transformer, so the next step also depends on the restored RNG state
    cfg = make_cfg(**{"train.epochs": 3, "train.grad_accum_steps": 2, "optim.grad_clip": 1.0})
    train_loader = loader(squares, cfg, train=True)
    a = make_engine(cfg, len(train_loader))
    a.train_one_epoch(train_loader, 0)
    a.train_step(*_batch(squares, 0))  # mid-epoch position: RNG, scheduler and EMA away from epoch boundaries
    a.epoch = 1
    path = save_checkpoint(a.state_dict(), tmp_path / "ckpt.pt")
    state = load_checkpoint(path)  # weights_only=True inside
    assert yaml.safe_load(state["config"]) == yaml.safe_load(cfg.to_yaml())

    # the uninterrupted run's next step (one process: the global RNG is shared, so run it before b exists)
    loss_a = a.train_step(*_batch(squares, 8))
    after = {k: v.clone() for k, v in a.model.state_dict().items()}
    ema_after = {k: v.clone() for k, v in a.ema.module.state_dict().items()}

    b = make_engine(
        cfg, len(train_loader), seed=123
    )  # other initial weights: everything must come from the file
    b.load_state_dict(state)
    assert b.train_step(*_batch(squares, 8)) == loss_a
    for name, value in b.model.state_dict().items():
        assert torch.equal(value, after[name]), name
    for name, value in b.ema.module.state_dict().items():
        assert torch.equal(value, ema_after[name]), name
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr() and a.global_step == b.global_step
    assert b.optimizer.state_dict()["state"][0]["step"] == a.optimizer.state_dict()["state"][0]["step"]

    # a whole further epoch (each epoch is seeded from (seed, rank, epoch)) stays identical too
    assert a.train_one_epoch(train_loader, 1)["loss"] == b.train_one_epoch(train_loader, 1)["loss"]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)

    # the check is sensitive to the RNG (dropout): the same resume with a disturbed RNG gives another step
    c = make_engine(cfg, len(train_loader), seed=123)
    c.load_state_dict(state)
    torch.manual_seed(99)
    c.train_step(*_batch(squares, 8))
    assert any(not torch.equal(v, after[k]) for k, v in c.model.state_dict().items())


def test_derived_seeds_are_distinct_per_rank_and_reproducible():
    assert derive_seed(0, 1) != derive_seed(1, 0) and derive_seed(0, 1) == derive_seed(0, 1)
    assert derive_seed(0, 0, 5) != derive_seed(0, 1, 5)


def test_rng_state_roundtrip_weights_only(tmp_path):
    seed_everything(5)
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    seed_everything(6)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_load_checkpoint_rejects_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(
        {"obj": socket.AF_INET.__class__}, path
    )  # a class: needs unpickling code, refused by weights_only
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# a write that runs out of room, for real: the file-size limit makes write(2) fail (EFBIG; SIGXFSZ ignored)
FULL_DISK_SAVE = """
import resource, signal, sys, torch
from q2l.engine.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
try:
    save_checkpoint({"w": torch.zeros(2**20)}, sys.argv[1])  # 4 MiB
except OSError as e:
    print(e)
    sys.exit(3)
"""


def test_a_checkpoint_write_that_fails_names_the_file_and_keeps_the_last_one(tmp_path):
    path = save_checkpoint({"w": torch.arange(3.0)}, tmp_path / "best.pt")
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SAVE, str(path)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"could not write checkpoint {path}" in out.stdout and "MiB free" in out.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no half-written temp file left behind
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))


class NanAfter(torch.nn.Module):
    """The real loss, but NaN from the ``n``-th call on (a diverging run)."""

    def __init__(self, loss: torch.nn.Module, n: int):
        super().__init__()
        self.loss, self.n, self.calls = loss, n, 0

    def forward(self, logits, targets):
        self.calls += 1
        value = self.loss(logits, targets)
        return value * float("nan") if self.calls > self.n else value


def test_non_finite_loss_raises_with_epoch_step_and_value(squares):
    cfg = make_cfg(**{"train.epochs": 1})
    train_loader = loader(squares, cfg, train=True)
    engine = make_engine(cfg, len(train_loader), loss_fn=NanAfter(build_loss(cfg.loss), 3))
    with pytest.raises(NonFiniteLossError) as info:
        engine.train_one_epoch(train_loader, 0)
    err = info.value
    assert (err.epoch, err.step) == (0, 3) and math.isnan(err.loss)
    assert "epoch 0" in str(err) and "step 3" in str(err) and "nan" in str(err)
    # raised before the optimizer step: the weights stay finite (the last checkpoint-able state is clean)
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert engine.global_step == 3


def test_no_weight_decay_groups():
    cfg = make_cfg()
    engine = make_engine(cfg, 4)
    model = engine.model
    groups = {g["name"]: g for g in engine.optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 1e-2 and groups["no_decay"]["weight_decay"] == 0.0
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    names = dict(model.named_parameters())
    assert ids["decay"].isdisjoint(ids["no_decay"])
    assert ids["decay"] | ids["no_decay"] == {id(p) for p in model.parameters() if p.requires_grad}
    embeddings = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings, "the label queries are an nn.Embedding"
    for n, p in names.items():
        in_no_decay = id(p) in ids["no_decay"]
        if p.squeeze().ndim <= 1 or any(n.startswith(e + ".") for e in embeddings):
            assert in_no_decay, n
        elif p.ndim >= 2:
            assert not in_no_decay, n
    assert any(n.endswith("bias") for n in no_decay_names(model))
    assert any("norm" in n or "bn" in n for n in no_decay_names(model))


def test_onecycle_counts_per_rank_optimizer_steps():
    cfg = make_cfg(**{"train.epochs": 3, "train.grad_accum_steps": 2})
    engine = make_engine(cfg, steps_per_epoch=7)
    assert engine.scheduler.total_steps == 3 * 4  # ceil(7 / 2) optimizer steps per epoch, per rank
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_scheduler(opt, cfg.optim, epochs=2, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(3e-3) and lrs.index(max(lrs)) == 1  # peak at pct_start 0.2 of 10 steps
    assert lrs[-1] == pytest.approx(3e-3 / 25 / 1e4, rel=1e-6)
    # short runs: torch divides by zero when pct_start · total = 1 (5 steps at 0.2); every length must run
    for total in range(1, 13):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        sched = build_scheduler(opt, cfg.optim, epochs=1, steps_per_epoch=total)
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        if total >= 3:
            assert lrs[0] < lrs[1] and max(lrs) > 0.5 * 3e-3  # at least one warm-up step


class TinyBN(torch.nn.Module):
    """Conv + BatchNorm: float buffers (running statistics) are averaged, the integer counter is copied."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def test_ema_equals_the_warmed_up_formula_buffers_included():
    torch.manual_seed(0)
    model = TinyBN()
    ema = build_ema(model, decay=0.9997)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    # reference: d(s) = min(decay, 1 - s^-0.75) for the s-th update, ema = d ema + (1 - d) model
    reference = {k: v.clone().double() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 31):
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()  # train mode: BN statistics move
        opt.step()
        opt.zero_grad()
        d = min(0.9997, 1 - step**-0.75)
        assert ema.get_decay(step) == pytest.approx(d, abs=1e-15)
        ema.update(model, step=step)
        for k, v in model.state_dict().items():
            reference[k] = d * reference[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
        if step == 1:  # d(1) = 0: a copy
            assert _state_equal(ema.module.state_dict(), model.state_dict())
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v.double(), reference[k], rtol=0, atol=1e-6), k
    assert int(ema.module.bn.num_batches_tracked) == 30
    assert not torch.allclose(ema.module.bn.running_mean, model.bn.running_mean)  # averaged, not copied
    assert ema.get_decay(10**7) == 0.9997  # capped at the configured decay
    with pytest.raises(ValueError, match="train.ema_decay"):
        build_ema(model, decay=1.0)


def test_engine_updates_the_ema_at_its_step_count(squares):
    engine = make_engine(make_cfg(), 4)
    engine.train_step(*_batch(squares, 0))
    assert _state_equal(engine.ema.module.state_dict(), engine.model.state_dict())  # step 1: d = 0, a copy
    ema_before = {k: v.clone() for k, v in engine.ema.module.state_dict().items()}
    engine.train_step(*_batch(squares, 8))
    d = 1 - 2**-0.75
    for k, v in engine.ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, d * ema_before[k] + (1 - d) * engine.model.state_dict()[k], atol=1e-6), k


def test_better_source_decides_ema_or_model():
    from types import SimpleNamespace as S

    assert better_source(S(map=50.0), S(map=51.0)) == ("ema", 51.0)
    assert better_source(S(map=50.0), S(map=50.0)) == ("model", 50.0)  # the EMA must be strictly better
    assert better_source(S(map=50.0), None) == ("model", 50.0)
    assert better_source(S(map=math.nan), S(map=3.0)) == ("ema", 3.0)
    source, value = better_source(S(map=math.nan), S(map=math.nan))
    assert source == "model" and math.isnan(value)


def test_single_process_collectives_are_identities():
    assert all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert broadcast_object({"a": 1}) == {"a": 1}


def test_precision_policy_cpu(monkeypatch):
    assert resolve_precision("fp32", "cpu").dtype is None
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")
    monkeypatch.setattr("q2l.engine.precision.cpu_bf16_supported", lambda: False)
    fallback = resolve_precision("bf16", "cpu")
    assert fallback.dtype is None and fallback.name == "fp32" and fallback.channels_last
    assert not resolve_precision("auto", "cpu", channels_last=False).channels_last


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no native bf16")
def test_bf16_autocast_path_on_cpu(squares):
    cfg = make_cfg(**{"train.precision": "auto", "train.epochs": 1})
    train_loader = loader(squares, cfg, train=True)
    engine = make_engine(cfg, len(train_loader))
    assert engine.precision.name == "bf16" and engine.precision.channels_last
    conv = next(m for m in engine.model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    handle = conv.register_forward_hook(lambda m, i, out: seen.append((out.dtype, i[0].dtype)))
    loss = engine.train_step(*_batch(squares, 0))
    handle.remove()
    assert seen == [(torch.bfloat16, torch.float32)] and math.isfinite(loss)  # autocast casts inside the conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.dtype == torch.float32  # master weights stay fp32


def test_fit_yields_results_and_stops_early(squares):
    # every holdout label positive: AP is 1 whatever the scores, so after epoch 0 the mAP can never improve
    cfg = make_cfg(**{"train.epochs": 5, "train.early_stop_patience": 1})
    train_loader = loader(Squares(16), cfg, train=True)
    holdout_set = Squares(16, seed=1)
    holdout_set.targets.fill_(1.0)
    holdout = loader(holdout_set, cfg, train=False)
    engine = make_engine(cfg, len(train_loader))
    results = list(engine.fit(train_loader, holdout))
    assert [r.epoch for r in results] == [0, 1]
    assert results[0].best and not results[1].best and results[1].stop
    assert results[0].holdout_ema is not None and results[0].holdout_map == 100.0
    assert engine.epoch == 2 and engine.best_epoch == 0 and engine.best_map == results[0].holdout_map


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_fit_keeps_the_best_weights_and_resume_keeps_them(tmp_path):
    cfg = make_cfg(**{"train.epochs": 3})
    squares = Squares(32)
    train_loader, holdout = loader(squares, cfg, train=True), loader(Squares(16, seed=1), cfg, train=False)
    a = make_engine(cfg, len(train_loader))
    assert a.best_weights is None and a.load_best_weights() is None
    kept = None
    for r in a.fit(train_loader, holdout):
        best = a.best_weights
        if r.best:
            # at the best epoch: a CPU copy of the weights that scored it, whichever of model and EMA
            source = a.ema.module if r.best_source == "ema" else a.model
            assert _state_equal(best["model"], source.state_dict())
            assert (best["source"], best["epoch"], best["holdout_map"]) == (
                r.best_source,
                r.epoch + 1,
                r.holdout_map,
            )
            kept = {k: v.clone() for k, v in best["model"].items()}
        assert kept is not None and _state_equal(best["model"], kept)  # a copy: later training leaves it
        assert best["holdout_map"] == a.best_map
    path = save_checkpoint(a.state_dict(), tmp_path / "ckpt.pt")
    b = make_engine(cfg, len(train_loader), seed=7)
    b.load_state_dict(load_checkpoint(path))
    assert {k: v for k, v in b.best_weights.items() if k != "model"} == {
        k: v for k, v in a.best_weights.items() if k != "model"
    }
    assert _state_equal(b.best_weights["model"], a.best_weights["model"])
    with torch.no_grad():
        for p in b.model.parameters():
            p.zero_()
    assert b.load_best_weights() is b.best_weights
    assert _state_equal(b.model.state_dict(), kept)
    # a checkpoint from before the Engine kept best weights still loads (the worker then sets them anew)
    old = load_checkpoint(path)
    del old["best_weights"]
    c = make_engine(cfg, len(train_loader))
    c.load_state_dict(old)
    assert c.best_weights is None


def test_gather_predictions_single_process_dedups_and_sorts():
    scores = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    s, t, i = gather_predictions(scores, scores * 10, torch.tensor([3, 1, 3, 0]))
    assert i.tolist() == [0, 1, 3] and s.flatten().tolist() == pytest.approx([0.4, 0.2, 0.1])
    assert t.flatten().tolist() == pytest.approx([4.0, 2.0, 1.0])


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = make_cfg(**{"train.epochs": 1, "train.grad_accum_steps": 2})
        train_loader = loader(Squares(40), cfg, train=True, rank=rank, world_size=world)
        eval_loader = loader(Squares(13, seed=3), cfg, train=False, rank=rank, world_size=world)
        engine = make_engine(cfg, len(train_loader), seed=rank)  # different init per rank: DDP must sync it
        stats = engine.train_one_epoch(train_loader, 0)
        sums = all_reduce_sum([float(rank), 1.0])
        shared = broadcast_object({"from": rank})
        pred = engine.predict(eval_loader)
        pred_ema = engine.predict(eval_loader, ema=True)
        # without accumulation the DDP wrap uses static_graph (no unused-parameter search)
        static = make_engine(make_cfg(**{"train.epochs": 1}), len(train_loader), seed=rank)
        static.train_one_epoch(train_loader, 0)
        torch.save(
            {
                "static_graph": static._ddp.static_graph,
                "static_params": {n: p.detach() for n, p in static.model.named_parameters()},
                "indices_seen": [int(i) for b in eval_loader for i in b[2]],
                "pred": (pred.scores, pred.targets, pred.indices),
                "pred_ema": pred_ema.scores,
                "model": engine.model.state_dict(),
                "total_steps": engine.scheduler.total_steps,
                "batches": len(train_loader),
                "loss": stats["loss"],
                "sums": sums,
                "shared": shared,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_two_processes_gather_without_duplicates(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # 13 items over 2 ranks: the DistributedSampler padded one repeat; predict dropped it
    assert len(r0["indices_seen"]) == len(r1["indices_seen"]) == 7
    assert r0["pred"][2].tolist() == list(range(13))
    for a, b in zip(r0["pred"], r1["pred"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(r0["pred_ema"], r1["pred_ema"])
    # DDP kept the replicas identical through an accumulated (no_sync) epoch; the loss is averaged over ranks
    for name, p in r0["model"].items():
        assert torch.equal(p, r1["model"][name]), name
    assert r0["loss"] == r1["loss"]
    assert r0["sums"] == r1["sums"] == [1.0, 2.0] and r0["shared"] == r1["shared"] == {"from": 0}
    assert r0["static_graph"] and r0["static_params"].keys() == r1["static_params"].keys()
    for name, p in r0["static_params"].items():
        assert torch.equal(p, r1["static_params"][name]), name
    # the schedule counts this rank's batches (20 items → 2 batches → 1 accumulated step), not all 5 batches
    assert r0["batches"] == 2 and r0["total_steps"] == 1
    # the gathered scores are the model's: recompute on one process from the saved weights
    cfg = make_cfg(**{"train.epochs": 1})
    ds = Squares(13, seed=3)
    engine = make_engine(cfg, 1)
    engine.model.load_state_dict(r0["model"])
    single = engine.predict(loader(ds, cfg, train=False))
    assert torch.allclose(single.scores, r0["pred"][0], atol=1e-6)
    assert torch.equal(single.targets, ds.targets)


@pytest.mark.slow
def test_compile_records_time_and_keeps_plain_state_keys(monkeypatch):
    # dynamo with the aot_eager backend: the real torch.compile wrapper and graph capture, without inductor's
    # C++ code generation (minutes on a small CPU; the inductor path is exercised on GPU by the benchmark)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    cfg = make_cfg(**{"train.epochs": 1, "train.compile": True})
    train_loader = loader(Squares(24), cfg, train=True)
    engine = make_engine(cfg, len(train_loader))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    stats = engine.train_one_epoch(train_loader, 0)
    assert stats["compile_seconds"] > 0 and math.isfinite(stats["loss"]) and stats["optimizer_steps"] == 3
    state = engine.state_dict()["model"]
    assert state.keys() == before.keys()  # no "_orig_mod." prefixes: checkpoints load into an eager model
    assert any(not torch.equal(state[k], before[k]) for k in before)
    assert engine.global_step == 3
