"""VerificationHook driven by a fake trainer: schedule, records, rank-0-only work, the wait protocol."""
import os
import pickle
import threading
import time

import cv2
import numpy as np
import pytest
import torch

from partialfc.config import default_config
from partialfc.eval import VerificationHook, embed_images, evaluate, load_bin
from partialfc.engine.hooks import HookBase


def _write_bin(path, n_pairs, seed):
    rng = np.random.default_rng(seed)
    bins, issame = [], []
    for i in range(n_pairs):
        same = bool(i % 2)
        base = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        other = base if same else rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        noise = rng.integers(0, 8, base.shape, dtype=np.uint8)
        for img in (base, np.clip(other.astype(int) + noise, 0, 255).astype(np.uint8)):
            bins.append(cv2.imencode(".png", img)[1].tobytes())
        issame.append(same)
    path.write_bytes(pickle.dumps((bins, issame)))
    return path


class _TinyNet(torch.nn.Module):
    def __init__(self, delay=0.0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.fc = torch.nn.Linear(4 * 14 * 14, 16)
        self.delay = delay
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class _Trainer:
    def __init__(self, config, comm=None, backbone=None, tb=None):
        self.config, self.comm = config, comm
        self.backbone = backbone if backbone is not None else _TinyNet()
        torch.manual_seed(0)
        self.device = torch.device("cpu")
        self.step, self.max_steps, self.output = 0, 5, None
        self.logs, self.metrics, self.tb = [], [], tb
        self.amp_dtype = None

    def log(self, msg):
        if self.comm is None or self.comm.rank == 0:
            self.logs.append(msg)

    def write_metrics(self, record):
        if self.comm is None or self.comm.rank == 0:
            self.metrics.append(dict(record))


class _TB:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def _drive(hook, trainer, steps):
    hook.trainer = trainer
    hook.before_train()
    for step in range(1, steps + 1):
        trainer.step = step
        hook.after_step()
    hook.after_train()


@pytest.fixture
def bins(tmp_path):
    return {"setA": _write_bin(tmp_path / "setA.bin", 30, 0), "setB": _write_bin(tmp_path / "setB.bin", 20, 1)}


def _config(targets, verbose):
    cfg = default_config()
    cfg.val_targets = targets
    cfg.verbose = verbose
    cfg.val_batch_size = 8
    return cfg


def test_schedule_records_logs_and_best(bins):
    cfg = _config(["setA", "missing", "setB"], verbose=2)
    resolver = lambda config, name: str(bins[name]) if name in bins else None  # noqa: E731
    hook = VerificationHook(cfg, path_resolver=resolver)
    assert isinstance(hook, HookBase)
    tb = _TB()
    trainer = _Trainer(cfg, tb=tb)
    _drive(hook, trainer, steps=5)

    # evaluations at step 0 (before_train), 2, 4 and 5 (after_train); two targets each
    steps = [m["step"] for m in trainer.metrics]
    assert steps == [0, 0, 2, 2, 4, 4, 5, 5]
    assert [m["target"] for m in trainer.metrics] == ["setA", "setB"] * 4
    for m in trainer.metrics:
        assert set(m) == {"step", "target", "accuracy", "std", "xnorm", "threshold", "best_accuracy"}
    warnings = [line for line in trainer.logs if "missing" in line]
    assert len(warnings) == 1  # warned once, then skipped
    result_lines = [line for line in trainer.logs if "Accuracy-Flip" in line]
    assert len(result_lines) == 8  # one line per target per evaluation

    # the reported numbers are those of the protocol on the same model
    images, issame = load_bin(bins["setA"])
    emb, xnorm = embed_images(trainer.backbone, images, 8, with_xnorm=True)
    ref = evaluate(emb, issame, xnorm=xnorm)
    last = trainer.metrics[-2]
    assert last["accuracy"] == pytest.approx(ref["accuracy"])
    assert last["xnorm"] == pytest.approx(ref["xnorm"], rel=1e-5)
    assert last["threshold"] == pytest.approx(ref["best_threshold"])
    for name in ("setA", "setB"):
        accs = [m["accuracy"] for m in trainer.metrics if m["target"] == name]
        assert hook.best[name] == pytest.approx(max(accs))
    assert ("setA", pytest.approx(last["accuracy"]), 5) in tb.scalars
    assert any(tag == "setB_xnorm" for tag, _, _ in tb.scalars)


def test_after_train_skips_a_step_just_evaluated(bins):
    cfg = _config(["setB"], verbose=2)
    hook = VerificationHook(cfg, path_resolver=lambda c, n: str(bins[n]))
    trainer = _Trainer(cfg)
    _drive(hook, trainer, steps=4)
    assert [m["step"] for m in trainer.metrics] == [0, 2, 4]
    assert trainer.backbone.training  # the hook gives the model back in training mode


def test_default_resolver_uses_partialfc_data(tmp_path):
    _write_bin(tmp_path / "lfw.bin", 10, 2)
    cfg = _config(["lfw", "cfp_fp"], verbose=100)
    cfg.rec = str(tmp_path)
    hook = VerificationHook(cfg)
    trainer = _Trainer(cfg)
    _drive(hook, trainer, steps=1)
    assert [m["target"] for m in trainer.metrics] == ["lfw", "lfw"]
    assert sum("cfp_fp" in line for line in trainer.logs) == 1


class _ThreadComm:
    """Ranks as threads: a blocking max/sum allreduce through a shared barrier; records wait times."""

    def __init__(self, rank, shared):
        self.rank, self.size, self.local_rank = rank, shared["size"], rank
        self.shared = shared
        self.waits = []

    def allreduce(self, tensor, op="sum"):
        t0 = time.monotonic()
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = tensor.clone()
        barrier.wait()
        stacked = torch.stack([slots[r] for r in range(self.size)])
        out = stacked.max(0).values if op == "max" else stacked.sum(0)
        barrier.wait()
        self.waits.append(time.monotonic() - t0)
        return out

    def barrier(self):
        self.shared["barrier"].wait()


def _run_ranks(cfg, resolver, size, backbones, steps):
    shared = {"size": size, "slots": {}, "barrier": threading.Barrier(size, timeout=60)}
    comms = [_ThreadComm(r, shared) for r in range(size)]
    trainers = [_Trainer(cfg, comm=comms[r], backbone=backbones[r]) for r in range(size)]
    hooks = [VerificationHook(cfg, path_resolver=resolver, poll_interval=0.05) for _ in range(size)]
    errors = {}

    def target(r):
        try:
            _drive(hooks[r], trainers[r], steps)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[r] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return comms, trainers, hooks, errors, time.monotonic() - t0


def test_only_rank_zero_computes_and_others_poll_in_short_collectives(bins):
    cfg = _config(["setA"], verbose=1)
    backbones = [_TinyNet(delay=0.02) for _ in range(3)]
    comms, trainers, hooks, errors, elapsed = _run_ranks(
        cfg, lambda c, n: str(bins[n]), 3, backbones, steps=1)
    assert not errors
    # rank 0 evaluated (steps 0 and 1), the others never ran their model nor logged
    assert [m["step"] for m in trainers[0].metrics] == [0, 1]
    assert len([line for line in trainers[0].logs if "Accuracy-Flip" in line]) == 2
    for r in (1, 2):
        assert backbones[r].calls == 0
        assert trainers[r].metrics == [] and trainers[r].logs == []
        assert hooks[r].last_step == 1
    # 60 images in batches of 8 -> 8 batches x 2 views x 20 ms per evaluation: the others polled many
    # times, each poll short compared with the whole evaluation
    assert backbones[0].calls == 2 * 2 * 8
    for r in (1, 2):
        assert len(comms[r].waits) >= 6
        assert max(comms[r].waits) < 0.5 * elapsed


def test_a_failure_on_rank_zero_reaches_the_other_ranks(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(pickle.dumps(([b"not an image", b"neither"], [True])))
    cfg = _config(["bad"], verbose=1)
    comms, trainers, hooks, errors, _ = _run_ranks(
        cfg, lambda c, n: str(bad), 2, [_TinyNet(), _TinyNet()], steps=1)
    assert "bad.bin" in str(errors[0])
    assert isinstance(errors[1], RuntimeError) and "rank 0" in str(errors[1])


def test_missing_target_warning_names_the_path_searched(tmp_path):
    cfg = _config(["lfw"], verbose=0)
    cfg.rec = str(tmp_path / "ms1m")
    trainer = _Trainer(cfg)
    _drive(VerificationHook(cfg), trainer, steps=1)
    expected = os.path.join(str(tmp_path / "ms1m"), "lfw.bin")
    assert [line for line in trainer.logs if "lfw" in line] == [
        f"warning: verification target 'lfw' not found (no file {expected}: targets are read from "
        f"<rec>/<name>.bin); it is skipped"]
    cfg = _config(["lfw"], verbose=0)
    cfg.rec = "synthetic"
    trainer = _Trainer(cfg)
    _drive(VerificationHook(cfg), trainer, steps=1)
    assert "(rec='synthetic' provides only 'synthetic_val')" in " ".join(trainer.logs)
