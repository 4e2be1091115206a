"""The training step and loop: micro-batching, non-finite steps, schedules, checkpoints and exact resume."""
import contextlib
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from partialfc import PartialFC, SparseAdamW, SparseSGD
from partialfc.comm import Communicator, HorovodComm, TorchDistComm
from partialfc.config import Config, ConfigError, load_config
from partialfc.engine import checkpointer as checkpoint
from partialfc.engine.hooks import HookBase
from partialfc.train import Trainer, poly_lr_lambda, step_lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step_only_trainer(model, pfc, gradient_acc=1, amp_dtype=None, scaler=None, max_bad_steps=3):
    """A Trainer holding just what ``train_step`` uses, around a BatchNorm-free model."""
    t = Trainer.__new__(Trainer)
    t.config = Config(clip_grad_norm=None, max_bad_steps=max_bad_steps, gradient_acc=gradient_acc)
    t.comm, t.device, t.amp_dtype, t.scaler = Communicator(), torch.device("cpu"), amp_dtype, scaler
    t.model = t.backbone = model
    t.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    t.pfc, t.pfc_optimizer = pfc, SparseSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
    t.step, t.bad_steps, t.logged = 0, 0, []
    t.log = t.logged.append
    return t


def _model_and_head(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.PReLU(), nn.Linear(16, 16)).to(dtype)
    pfc = PartialFC(16, 60, sample_rate=0.25, comm=Communicator(), seed=5).to(dtype)
    return model, pfc


def test_four_micro_batches_of_8_equal_one_batch_of_32():
    x = torch.randn(32, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 60, (32,))
    big = _step_only_trainer(*_model_and_head())
    loss_big = [big.train_step([(x, y)]) for _ in range(2)]
    micro = _step_only_trainer(*_model_and_head(), gradient_acc=4)
    loss_micro = [micro.train_step([(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]) for _ in range(2)]
    assert loss_micro == pytest.approx(loss_big, abs=1e-12)
    for a, b in zip(big.model.parameters(), micro.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(big.pfc.weight, micro.pfc.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(big.pfc_optimizer.momentum_buffer(), micro.pfc_optimizer.momentum_buffer(),
                               atol=1e-5, rtol=0)
    assert not micro.pfc.holding_sample  # released after the step


def test_non_finite_step_is_skipped_then_stops_with_advice():
    model, pfc = _model_and_head(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    t = _step_only_trainer(model, pfc, amp_dtype=torch.float16, scaler=scaler, max_bad_steps=3)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 60, (8,))
    t.train_step([(x, y)])
    weights = [p.detach().clone() for p in model.parameters()] + [pfc.weight.detach().clone()]
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = math.inf
    for i in range(2):
        scale = scaler.get_scale()
        t.train_step([(poisoned, y)])
        assert scaler.get_scale() == scale / 2  # the fp16 scale backs off
        assert t.bad_steps == i + 1
        assert "step skipped, fp16 scale lowered" in t.logged[-1]
    after = [p.detach() for p in model.parameters()] + [pfc.weight.detach()]
    assert all(torch.equal(a, b) for a, b in zip(weights, after))  # nothing moved
    with pytest.raises(FloatingPointError, match="3 consecutive steps with non-finite .* likely fixes: lower lr"):
        t.train_step([(poisoned, y)])


def test_good_step_resets_the_bad_step_count():
    model, pfc = _model_and_head(torch.float32)
    t = _step_only_trainer(model, pfc)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 60, (8,))
    bad = x.clone()
    bad[1] = math.nan
    t.train_step([(bad, y)])
    assert t.bad_steps == 1
    t.train_step([(x, y)])
    assert t.bad_steps == 0


def test_single_process_comm_hands_offs_are_plain_calls():
    comm = Communicator()
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with comm.no_sync(model):  # nothing to skip: gradients accumulate as always
        model(torch.ones(1, 3)).sum().backward()
    assert torch.equal(model.bias.grad, torch.ones(2))
    before = model.bias.detach().clone()
    comm.wait_for_gradients(optimizer)
    comm.step_after_wait(optimizer)
    assert torch.equal(model.bias.detach(), before - 0.5)
    comm.consolidate_optimizer_state(optimizer)
    assert optimizer.state_dict()["state"]  # left as it was
    with pytest.raises(ConfigError, match="zero_optimizer=True is not supported with the 'single' backend"):
        comm.zero_redundancy_optimizer(model.parameters(), torch.optim.SGD, lr=0.1)


class _RecordingOptimizer:
    def __init__(self):
        self.calls = []

    def synchronize(self):
        self.calls.append("synchronize")

    def step(self):
        self.calls.append("step")

    def skip_synchronize(self):
        @contextlib.contextmanager
        def skipping():
            self.calls.append("skip on")
            yield
            self.calls.append("skip off")
        return skipping()


def test_backend_comms_wrap_their_wrappers_hand_offs():
    hvd, optimizer = HorovodComm.__new__(HorovodComm), _RecordingOptimizer()
    hvd.wait_for_gradients(optimizer)
    hvd.step_after_wait(optimizer)
    assert optimizer.calls == ["synchronize", "skip on", "step", "skip off"]
    with hvd.no_sync(nn.Linear(1, 1)):  # the DistributedOptimizer counts backward passes instead
        pass

    class _DDPLike(nn.Linear):
        entered = 0

        def no_sync(self):
            type(self).entered += 1
            return contextlib.nullcontext()

    with TorchDistComm.__new__(TorchDistComm).no_sync(_DDPLike(1, 1)):
        pass
    assert _DDPLike.entered == 1
    TorchDistComm.__new__(TorchDistComm).consolidate_optimizer_state(optimizer)  # not sharded: nothing to do
    assert optimizer.calls == ["synchronize", "skip on", "step", "skip off"]


def test_a_sealed_checkpoint_keeps_the_last_two(tmp_path):
    for step in (2, 4, 6):
        folder = checkpoint.step_dir(str(tmp_path), step)
        os.makedirs(folder)
        for name in ("rank_0.pt", "rank_1.pt", "trainer.pt"):
            checkpoint.save_atomic({"step": step}, os.path.join(folder, name))
        checkpoint.write_manifest(folder, 2, step)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_4", "step_6"]
    assert checkpoint.latest_complete(str(tmp_path)).endswith("step_6")
    assert sorted(os.listdir(tmp_path / "checkpoints" / "step_6")) == [
        checkpoint.MANIFEST, "rank_0.pt", "rank_1.pt", "trainer.pt"]  # no temporary files left
    os.remove(tmp_path / "checkpoints" / "step_6" / "rank_1.pt")
    assert checkpoint.latest_complete(str(tmp_path)).endswith("step_4")  # a torn folder is skipped
    with pytest.raises(RuntimeError, match="missing"):
        checkpoint.write_manifest(checkpoint.step_dir(str(tmp_path), 6), 2, 6)


def test_schedules():
    poly = poly_lr_lambda(max_steps=100, warmup_steps=10)
    assert poly(0) == pytest.approx(0.1) and poly(9) == pytest.approx(1.0)
    assert poly(55) == pytest.approx(0.25) and poly(100) == 0.0
    step = step_lr_lambda([0.5, 75], 0.1, 0, 100)
    assert [step(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def _tiny_config(tmp_path, **overrides):
    cfg = load_config(os.path.join(ROOT, "configs", "synthetic.py"), [
        f"output='{tmp_path / 'out'}'", f"data_root='{tmp_path.parent / 'data'}'", "synthetic_ids=16",
        "synthetic_images_per_id=8", "synthetic_val_ids=4", "synthetic_val_pairs=8", "val_targets=[]",
        "batch_size=16", "embedding_size=32", "num_workers=0", "max_steps=6", "frequent=100",
        "tensorboard=False", "sample_rate=0.5", "comm_backend='single'"])
    cfg.update(overrides)
    return cfg


class _Losses(HookBase):
    def __init__(self, stop_at=None):
        self.losses, self.stop_at = {}, stop_at

    def after_step(self):
        self.losses[self.trainer.step] = self.trainer.last_loss
        if self.trainer.step == self.stop_at:
            raise KeyboardInterrupt("simulated interruption")


def _train(cfg, stop_at=None):
    trainer = Trainer(cfg)
    hook = _Losses(stop_at)
    trainer.register_hooks([hook])
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer, hook.losses


def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path):
    _, full = _train(_tiny_config(tmp_path / "a", save_every=3))
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    interrupted = _tiny_config(tmp_path / "b", save_every=3)
    _, first = _train(interrupted, stop_at=4)
    assert checkpoint.latest_complete(interrupted.output).endswith("step_3")
    resumed, rest = _train(Config(interrupted, resume=True))
    assert resumed.step == 6 and sorted(rest) == [4, 5, 6]
    for step in (1, 2, 3):
        assert first[step] == pytest.approx(full[step], abs=1e-6)
    for step in (4, 5, 6):
        assert rest[step] == pytest.approx(full[step], abs=1e-6), (step, rest, full)


def test_resume_with_another_world_size_re_splits_the_centers(tmp_path):
    from partialfc.engine import reshard
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=2)
    _train(cfg)
    folder = checkpoint.latest_complete(cfg.output)
    shard = checkpoint.load(os.path.join(folder, "rank_0.pt"))
    merged = reshard.merge(folder)
    # The same checkpoint as 4 ranks write it: 16 classes in shards of 4.
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    reshard.split(merged, 4, cfg.output, log=lambda message: None)
    assert checkpoint.load(os.path.join(folder, "trainer.pt"))["world_size"] == 4
    resumed = Trainer(Config(cfg, resume=True))
    resumed.close()
    assert resumed.step == 2
    assert torch.equal(resumed.pfc.weight.detach(), shard["weight"])
    assert torch.equal(resumed.pfc_optimizer.momentum_buffer(), shard["pfc_optimizer"]["state"][0]["momentum_buffer"])
    with open(os.path.join(cfg.output, "training.log")) as f:
        assert "re-split 16 classes from 4 ranks to 1: rank 0 [0, 16) <- rank_0.pt[0:4] + rank_1.pt[0:4]" in f.read()


KILL_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {root!r})
from partialfc.engine import checkpointer as checkpoint
from partialfc.config import Config
from partialfc.train import Trainer
import json
cfg = Config(json.loads({cfg!r}))
real_save = checkpoint.save_atomic
def slow_save(obj, path):
    if "step_4" in path and path.endswith("trainer.pt"):
        # Write half of the file under its temporary name, then hang: the parent kills us here.
        with open(path + ".tmp-partial", "wb") as f:
            f.write(b"\0" * 4096)
        open(os.path.join(os.path.dirname(path), "KILL_ME"), "w").close()
        time.sleep(600)
    real_save(obj, path)
checkpoint.save_atomic = slow_save
Trainer(cfg).train()
"""


def test_sigkill_during_a_checkpoint_save_loses_nothing(tmp_path):
    import json
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=6)
    script = KILL_SCRIPT.format(root=ROOT, cfg=json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = os.path.join(cfg.output, "checkpoints", "step_4", "KILL_ME")
    deadline = time.time() + 300
    while not os.path.exists(marker):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the run never reached the step-4 save"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The torn step-4 folder is ignored; step 2 is whole and resumes.
    assert checkpoint.latest_complete(cfg.output).endswith("step_2")
    resumed = Trainer(Config(cfg, resume=True))
    assert resumed.step == 2


def test_zero_optimizer_needs_torch_distributed(tmp_path):
    with pytest.raises(ConfigError, match="zero_optimizer=True is not supported with the 'single' backend"):
        Trainer(_tiny_config(tmp_path, zero_optimizer=True))


def test_bf16_training_runs_and_learns(tmp_path):
    cfg = _tiny_config(tmp_path, amp_dtype="bfloat16", max_steps=8, lr=0.05)
    trainer, losses = _train(cfg)
    assert trainer.amp_dtype == torch.bfloat16 and trainer.scaler is None
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[8] < losses[1]


def test_trainer_step_keeps_the_fused_center_update(monkeypatch):
    from partialfc import ops
    if not isinstance(ops.op_table("cpu"), ops.CompiledOps):
        pytest.fail("partialfc._C is not built: run setup-utils/install.sh") if os.environ.get("CI") else \
            pytest.skip("partialfc._C is not built")
    calls = []
    real = ops.CompiledOps.normalize_backward_sgd_update
    monkeypatch.setattr(ops.CompiledOps, "normalize_backward_sgd_update", lambda *a: calls.append(1) or real(*a))
    model, pfc = _model_and_head(torch.float32)
    t = _step_only_trainer(model, pfc)
    before = pfc.weight.detach().clone()
    t.train_step([(torch.randn(8, 3, 4, 4), torch.randint(0, 60, (8,)))])
    # The step ran the fused update once, and the sampled rows moved.
    assert calls == [1]
    assert not torch.equal(before[pfc.sampled_index], pfc.weight.detach()[pfc.sampled_index])


def test_skipped_step_leaves_batchnorm_statistics_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.PReLU(), nn.Linear(16, 16))
    pfc = PartialFC(16, 60, sample_rate=0.25, comm=Communicator(), seed=5)
    t = _step_only_trainer(model, pfc)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 60, (8,))
    t.train_step([(x, y)])
    before = {name: b.detach().clone() for name, b in model.named_buffers()}
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = math.inf
    t.train_step([(poisoned, y)])
    assert t.bad_steps == 1
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name  # running_mean, running_var, num_batches_tracked
    t.train_step([(x, y)])  # a good step moves them again
    assert not torch.equal(model[2].running_mean, before["2.running_mean"])


def test_checkpoint_due_during_skipped_steps_waits_for_a_good_step():
    from partialfc.engine.hooks import CheckpointHook

    saved = []
    hook = CheckpointHook(type("C", (), {"save": lambda self, step, epoch, pos: saved.append(step)})(), 2, False)
    hook.trainer = t = type("T", (), {})()
    t.max_steps, t.epoch, t.batch_in_epoch = 100, 0, 0
    for step, bad in [(1, 0), (2, 0), (3, 0), (4, 1), (5, 2), (6, 3), (7, 0), (8, 0)]:
        t.step, t.bad_steps = step, bad
        hook.after_step()
    # step 4 and 6 fell in a streak of skipped steps: one checkpoint at the first good step after it
    assert saved == [2, 7, 8]


def test_resume_with_another_lr_trains_at_the_new_lr(tmp_path):
    cfg = _tiny_config(tmp_path, save_every=3, lr=0.1, warmup_epoch=0)
    first, _ = _train(cfg, stop_at=4)
    factor = first.schedulers[0].lr_lambdas[0]
    resumed = Trainer(Config(cfg, resume=True, lr=0.01))
    assert resumed.step == 3
    for opt in (resumed.optimizer, resumed.pfc_optimizer):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor(3), rel=1e-12)

    class Lrs(HookBase):
        seen = {}

        def after_step(self):
            t = self.trainer
            self.seen[t.step] = (t.optimizer.param_groups[0]["lr"], t.pfc_optimizer.param_groups[0]["lr"])

    resumed.register_hooks([Lrs()])
    resumed.train()
    for step in (4, 5):  # the scheduled lr after each step follows the new base
        assert factor(step) > 0
        assert Lrs.seen[step] == pytest.approx((0.01 * factor(step),) * 2, rel=1e-12)
    with open(os.path.join(cfg.output, "training.log")) as f:
        assert "base lr 0.1 in the checkpoint, 0.01 in the config" in f.read()


def _two_checkpoints(tmp_path):
    """A run that leaves checkpoints at steps 4 and 5 (the last two kept): the config and step_5's folder."""
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=5, save_all_states=True)
    _train(cfg)
    assert sorted(os.listdir(os.path.join(cfg.output, "checkpoints"))) == ["step_4", "step_5"]
    return cfg, os.path.join(cfg.output, "checkpoints", "step_5")


def _resume_log(cfg):
    resumed = Trainer(Config(cfg, resume=True))
    with open(os.path.join(cfg.output, "training.log")) as f:
        return resumed, f.read()


def test_damaged_shard_is_named_and_resume_falls_back(tmp_path):
    cfg, newest = _two_checkpoints(tmp_path)
    path = os.path.join(newest, "rank_0.pt")
    with open(path, "r+b") as f:  # 4 KB overwritten inside the file: same size, other bytes
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x7f" * 4096)
    resumed, log = _resume_log(cfg)
    assert resumed.step == 4
    assert f"{path} does not match the sha256 checksum" in log
    assert f"resumed from {os.path.dirname(newest)}{os.sep}step_4 at step 4" in log


def test_truncated_trainer_file_is_named_and_resume_falls_back(tmp_path):
    cfg, newest = _two_checkpoints(tmp_path)
    path = os.path.join(newest, "trainer.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    resumed, log = _resume_log(cfg)
    assert resumed.step == 4
    assert f"{path} is missing or not" in log


def test_non_finite_checkpoint_is_never_sealed(tmp_path):
    cfg = _tiny_config(tmp_path, save_every=0, max_steps=1)
    trainer, _ = _train(cfg)
    with torch.no_grad():
        trainer.pfc.weight[0, 0] = float("nan")
    trainer.checkpointer.save(7, 0, 0)
    folder = checkpoint.step_dir(cfg.output, 7)
    assert not os.path.exists(os.path.join(folder, checkpoint.MANIFEST))
    assert checkpoint.latest_complete(cfg.output).endswith("step_1")  # the run's own final checkpoint


@pytest.mark.parametrize("optimizer,backbone_cls,center_cls", [
    ("sgd", torch.optim.SGD, SparseSGD), ("adamw", torch.optim.AdamW, SparseAdamW)])
def test_each_parameter_gets_the_configured_optimizer(tmp_path, optimizer, backbone_cls, center_cls):
    cfg = _tiny_config(tmp_path, optimizer=optimizer, lr=0.002, weight_decay=0.1)
    trainer = Trainer(cfg)
    trainer.close()
    assert type(trainer.optimizer) is backbone_cls and type(trainer.pfc_optimizer) is center_cls
    backbone_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    center_params = [p for g in trainer.pfc_optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in backbone_params} == {id(p) for p in trainer.backbone.parameters()}
    assert [id(p) for p in center_params] == [id(trainer.pfc.weight)]
    for opt in (trainer.optimizer, trainer.pfc_optimizer):  # the same lr and weight decay for both
        assert opt.param_groups[0]["weight_decay"] == 0.1
        assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.002)


def test_vit_configs_train_the_centers_with_adamw():
    vit = [name for name in os.listdir(os.path.join(ROOT, "configs")) if "vit" in name]
    assert len(vit) >= 5
    for name in vit:
        cfg = load_config(os.path.join(ROOT, "configs", name))
        assert cfg.optimizer == "adamw", name  # so the Trainer gives the centers SparseAdamW (test above)


def test_interrupted_and_resumed_adamw_run_gives_the_same_losses(tmp_path):
    adamw = dict(optimizer="adamw", lr=0.002, weight_decay=0.1, save_every=3)
    _, full = _train(_tiny_config(tmp_path / "a", **adamw))
    interrupted = _tiny_config(tmp_path / "b", **adamw)
    _train(interrupted, stop_at=4)
    resumed, rest = _train(Config(interrupted, resume=True))
    assert isinstance(resumed.pfc_optimizer, SparseAdamW) and sorted(rest) == [4, 5, 6]
    for step in (4, 5, 6):
        assert rest[step] == pytest.approx(full[step], abs=1e-6), (step, rest, full)
    state = resumed.pfc_optimizer.state[resumed.pfc.weight]
    assert int(state["row_step"].max()) <= 6 and int(state["row_step"].sum()) > 0


@pytest.mark.parametrize("margin_type", ["adaface", "curricularface"])
def test_resumed_adaptive_margin_run_keeps_its_running_statistics(tmp_path, margin_type):
    margin = dict(margin_type=margin_type, save_every=3)
    full_trainer, full = _train(_tiny_config(tmp_path / "a", **margin))
    interrupted = _tiny_config(tmp_path / "b", **margin)
    first, _ = _train(interrupted, stop_at=4)
    resumed = Trainer(Config(interrupted, resume=True))
    saved = checkpoint.load(os.path.join(checkpoint.step_dir(interrupted.output, 3), "trainer.pt"))["head"]
    assert saved and set(saved) == set(resumed.pfc.head_state())
    for name, value in resumed.pfc.head_state().items():  # restored, not the initial values
        assert torch.equal(value, saved[name]), name
    hook = _Losses()
    resumed.register_hooks([hook])
    resumed.train()
    for step in (4, 5, 6):
        assert hook.losses[step] == pytest.approx(full[step], abs=1e-6), (step, hook.losses, full)
    for name, value in resumed.pfc.head_state().items():
        torch.testing.assert_close(value, full_trainer.pfc.head_state()[name], atol=1e-6, rtol=0)


def test_a_vit_config_trains_its_centers_with_sparse_adamw(tmp_path):
    """configs/wf42m_pfc02_40epoch_8gpu_vit_t.py as shipped, on the synthetic data for three steps: the centers
    get SparseAdamW at the config's lr and weight decay, and the sampled rows move."""
    cfg = load_config(os.path.join(ROOT, "configs", "wf42m_pfc02_40epoch_8gpu_vit_t.py"), [
        f"output='{tmp_path / 'out'}'", f"data_root='{tmp_path / 'data'}'", "rec='synthetic'", "num_classes=None",
        "num_image=None", "synthetic_ids=16", "synthetic_images_per_id=4", "synthetic_val_ids=4",
        "synthetic_val_pairs=8", "batch_size=8", "num_workers=0", "max_steps=3", "warmup_epoch=0", "fp16=False",
        "tensorboard=False", "comm_backend='single'", "frequent=100"])
    trainer = Trainer(cfg)
    before = trainer.pfc.weight.detach().clone()
    trainer.train()
    opt = trainer.pfc_optimizer
    assert isinstance(opt, SparseAdamW) and isinstance(trainer.optimizer, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["initial_lr"] == pytest.approx(0.001)
    row_step = opt.state[trainer.pfc.weight]["row_step"]
    moved = (trainer.pfc.weight != before).any(dim=1)
    assert moved.any() and torch.equal(moved, row_step > 0)  # exactly the rows that were ever sampled
