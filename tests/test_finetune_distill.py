"""Fine-tuning from existing weights (init_backbone, init_centers, backbone_lr_mult, freeze_backbone_steps) and
feature distillation from a teacher (teacher_network, teacher_weights, teacher_embedding_size, distill_loss,
distill_weight).

arcface_torch's files, as these tests write them (layouts described, not copied from its code):

- ``backbone.pth`` / ``model.pt``: the backbone's state dict (parameter name -> tensor) saved bare.
- ``checkpoint_gpu_<rank>.pt``: a dict with ``epoch`` and ``global_step`` (ints), ``state_dict_backbone`` (the
  backbone's state dict), ``state_dict_softmax_fc`` (that rank's PartialFC state dict: ``weight``
  ``[num_local, D]``), ``state_optimizer`` and ``state_lr_scheduler`` (optimizer / scheduler state dicts).
- ``softmax_fc_gpu_<rank>.pt``: that rank's PartialFC state dict, ``{"weight": [num_local, D]}``. Rank r holds the
  r-th contiguous class range, the first ``num_classes % world_size`` ranks one class more.
"""
import json
import math
import os
import re

import pytest
import torch

from test_training import _tiny_config, _train

from partialfc.backbones import get_model
from partialfc.config import Config, ConfigError, load_config
from partialfc.data import val_bin_path
from partialfc.engine.hooks import HookBase
from partialfc.engine.init_weights import InitWeightsError, load_center_shard
from partialfc.eval.model_io import build_backbone
from partialfc.eval.verification import forward_views, load_bin, test_bin
from partialfc.head.partial_fc import partition_classes
from partialfc.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES, DIM = 16, 32  # _tiny_config's synthetic_ids and embedding_size


def _config(tmp_path, **overrides):
    # Enough held-out pairs for 10-fold verification.
    return _tiny_config(tmp_path, synthetic_val_ids=8, synthetic_val_pairs=40, **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 40-step run on the tiny synthetic set: its config, per-step losses, backbone state and the
    class centers of its one rank."""
    cfg = _config(tmp_path_factory.mktemp("finished"), max_steps=40)
    _, losses = _train(cfg)
    state = torch.load(os.path.join(cfg.output, "model.pt"), weights_only=True)
    centers = torch.load(os.path.join(cfg.output, "softmax_fc_rank_0.pt"), weights_only=True)["weight"]
    assert centers.shape == (NUM_CLASSES, DIM)
    return cfg, losses, state, centers


def _step0_record(cfg):
    with open(os.path.join(cfg.output, "metrics.jsonl")) as f:
        return next(r for r in map(json.loads, f) if r["step"] == 0)


# --------------------------------------------------------------------------------------------------
# a) a backbone in arcface_torch's layouts


@pytest.mark.parametrize("layout", ["backbone.pth", "checkpoint_gpu_0.pt"])
def test_arcface_torch_backbone_starts_the_run_at_its_own_accuracy(finished, tmp_path, layout):
    _, _, state, centers = finished
    path = str(tmp_path / layout)
    if layout == "backbone.pth":
        torch.save(state, path)
    else:
        torch.save(dict(epoch=4, global_step=40, state_dict_backbone=state,
                        state_dict_softmax_fc={"weight": centers}, state_optimizer={"state": {}, "param_groups": []},
                        state_lr_scheduler={"last_epoch": 40}), path)
    cfg = _config(tmp_path, max_steps=1, init_backbone=path, val_targets=["synthetic_val"])
    _train(cfg)
    # The backbone evaluated on its own, through the same verification code.
    images, issame = load_bin(val_bin_path(cfg, "synthetic_val"))
    alone = test_bin(build_backbone("small", DIM, state, path), images, issame, batch_size=cfg.val_batch_size)
    record = _step0_record(cfg)
    assert record["accuracy"] == alone["accuracy"] and record["xnorm"] == pytest.approx(alone["xnorm"], rel=1e-6)
    with open(os.path.join(cfg.output, "training.log")) as f:
        log = f.read()
    assert f"init_backbone: small weights from {path}" in log and "training starts from init_backbone" in log


# --------------------------------------------------------------------------------------------------
# b) class centers from a finished run, and shards of another world size


def test_centers_from_a_finished_run_continue_its_loss(finished, tmp_path):
    cfg0, losses0, _, centers = finished
    final = sum(losses0[s] for s in range(35, 41)) / 6
    tuned = _config(tmp_path / "tuned", max_steps=6, lr=0.01, init_backbone=cfg0.output, init_centers=cfg0.output)
    trainer = Trainer(tuned)
    assert torch.equal(trainer.pfc.weight.detach(), centers)  # the run's centers, exactly
    trainer.close()
    _, tuned_losses = _train(tuned)
    fresh = _config(tmp_path / "fresh", max_steps=6, lr=0.01, init_backbone=cfg0.output)
    _, fresh_losses = _train(fresh)
    first_tuned = sum(tuned_losses.values()) / 6
    first_fresh = sum(fresh_losses.values()) / 6
    first_run = sum(losses0[s] for s in range(1, 7)) / 6
    # No jump: the fine-tuned run starts where the finished one ended; a new head starts far above it.
    assert abs(first_tuned - final) < 0.25 * first_run, (first_tuned, final, first_fresh)
    assert first_fresh > 3 * max(first_tuned, final), (first_tuned, final, first_fresh)


def _write_shards(folder, centers, world_size, layout):
    os.makedirs(folder, exist_ok=True)
    for rank in range(world_size):
        start, num_local = partition_classes(centers.shape[0], rank, world_size)
        rows = centers[start:start + num_local].clone()
        if layout == "ours":
            torch.save(dict(weight=rows, class_start=start, num_classes=centers.shape[0], world_size=world_size),
                        os.path.join(folder, f"softmax_fc_rank_{rank}.pt"))
        elif layout == "softmax_fc_gpu":
            torch.save({"weight": rows}, os.path.join(folder, f"softmax_fc_gpu_{rank}.pt"))
        else:
            torch.save(dict(epoch=1, global_step=10, state_dict_backbone={"w": torch.zeros(1)},
                            state_dict_softmax_fc={"weight": rows}), os.path.join(folder, f"checkpoint_gpu_{rank}.pt"))
    return str(folder)


@pytest.mark.parametrize("layout", ["ours", "softmax_fc_gpu", "checkpoint_gpu"])
def test_two_rank_shards_are_merged_onto_one_rank(tmp_path, layout):
    centers = torch.randn(NUM_CLASSES, DIM)
    folder = _write_shards(tmp_path / "shards", centers, 2, layout)
    trainer = Trainer(_config(tmp_path, init_centers=folder))
    trainer.close()
    assert torch.equal(trainer.pfc.weight.detach(), centers)


def test_shards_are_resplit_for_any_world_size(tmp_path):
    centers = torch.randn(NUM_CLASSES, DIM)
    for written, layout in ((2, "ours"), (3, "softmax_fc_gpu")):
        folder = _write_shards(tmp_path / f"{layout}_{written}", centers, written, layout)
        for world_size in (1, 2, 3, 5):
            for rank in range(world_size):
                start, num_local = partition_classes(NUM_CLASSES, rank, world_size)
                got = load_center_shard(folder, NUM_CLASSES, DIM, rank, world_size)
                assert torch.equal(got, centers[start:start + num_local]), (layout, written, world_size, rank)
    # One file of the set names the whole set.
    one = os.path.join(tmp_path, "ours_2", "softmax_fc_rank_1.pt")
    assert torch.equal(load_center_shard(one, NUM_CLASSES, DIM, 0, 1), centers)


def test_a_checkpoint_folder_gives_its_backbone_and_centers(tmp_path):
    cfg = _config(tmp_path / "run", max_steps=3, save_every=2)
    _train(cfg)
    folder = os.path.join(cfg.output, "checkpoints", "step_2")
    trainer = Trainer(_config(tmp_path / "tuned", init_backbone=folder, init_centers=folder))
    trainer.close()
    saved = torch.load(os.path.join(folder, "trainer.pt"), weights_only=True)["backbone"]
    assert all(torch.equal(v, saved[k]) for k, v in trainer.backbone.state_dict().items())
    shard = torch.load(os.path.join(folder, "rank_0.pt"), weights_only=True)["weight"]
    assert torch.equal(trainer.pfc.weight.detach(), shard)
    assert not torch.equal(shard, torch.load(os.path.join(cfg.output, "softmax_fc_rank_0.pt"),
                                             weights_only=True)["weight"])  # step 2's centers, not the final ones


# --------------------------------------------------------------------------------------------------
# c) freeze_backbone_steps and backbone_lr_mult


class _Snapshots(HookBase):
    def __init__(self):
        self.backbone, self.centers, self.lrs = {}, {}, {}

    def before_train(self):
        self.after_step()

    def after_step(self):
        t = self.trainer
        self.backbone[t.step] = {k: v.detach().clone() for k, v in t.backbone.state_dict().items()}
        self.centers[t.step] = t.pfc.weight.detach().clone()
        self.lrs[t.step] = (t.optimizer.param_groups[0]["lr"], t.pfc_optimizer.param_groups[0]["lr"])


def _snapshots(cfg):
    trainer = Trainer(cfg)
    hook = _Snapshots()
    trainer.register_hooks([hook])
    trainer.train()
    return trainer, hook


def test_frozen_steps_train_only_the_head(tmp_path):
    _, snap = _snapshots(_config(tmp_path, max_steps=5, freeze_backbone_steps=3))
    start = snap.backbone[0]
    assert any("running_mean" in k for k in start)  # BatchNorm statistics are part of what must not move
    for step in (1, 2, 3):
        for key, value in snap.backbone[step].items():
            assert torch.equal(value, start[key]), (step, key)
        assert not torch.equal(snap.centers[step], snap.centers[step - 1]), step  # the head learns
    moved = [k for k, v in snap.backbone[4].items() if not torch.equal(v, start[k])]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("conv1.weight") for k in moved)


def test_backbone_lr_mult_scales_the_backbone_lr_only(tmp_path):
    trainer, snap = _snapshots(_config(tmp_path, max_steps=4, lr=0.1, backbone_lr_mult=0.1))
    factor = trainer.schedulers[0].lr_lambdas[0]
    for step in range(4):
        assert snap.lrs[step] == pytest.approx((0.01 * factor(step), 0.1 * factor(step)), rel=1e-12), step


# --------------------------------------------------------------------------------------------------
# d) mismatches


def _refused(cfg):
    with pytest.raises(InitWeightsError) as info:
        Trainer(cfg)
    return str(info.value)


def test_mismatches_name_the_file_and_both_values(finished, tmp_path):
    _, _, state, centers = finished
    mbf = str(tmp_path / "mbf.pth")
    torch.save(get_model("mbf", num_features=DIM).state_dict(), mbf)
    msg = _refused(_config(tmp_path / "a", init_backbone=mbf))
    assert mbf in msg and "'mbf'" in msg and "network is 'small'" in msg, msg

    wide = str(tmp_path / "wide.pth")
    torch.save(get_model("small", num_features=64).state_dict(), wide)
    msg = _refused(_config(tmp_path / "b", init_backbone=wide))
    assert wide in msg and "embedding size 64 in the file, 32 in this run" in msg, msg

    more = _write_shards(tmp_path / "more", torch.randn(20, DIM), 2, "ours")
    msg = _refused(_config(tmp_path / "c", init_centers=more))
    assert more in msg and "20 classes in the files, 16 in this run" in msg, msg

    narrow = _write_shards(tmp_path / "narrow", torch.randn(NUM_CLASSES, 48), 2, "softmax_fc_gpu")
    msg = _refused(_config(tmp_path / "d", init_centers=narrow))
    assert narrow in msg and "embedding size 48 in the files, 32 in this run" in msg, msg

    torn = _write_shards(tmp_path / "torn", centers, 2, "ours")
    os.remove(os.path.join(torn, "softmax_fc_rank_1.pt"))
    msg = _refused(_config(tmp_path / "e", init_centers=torn))
    assert os.path.join(torn, "softmax_fc_rank_1.pt") in msg and "says world_size 2" in msg, msg

    for name, start, words in (
            ("gap", 7, "(classes [7, 12)): classes [6, 7) are in no shard (a gap"),
            ("overlap", 5, "(classes [5, 10)): overlaps the classes up to 6 of the shard before it")):
        folder = _write_shards(tmp_path / name, centers, 3, "ours")  # 6 + 5 + 5 classes
        file = os.path.join(folder, "softmax_fc_rank_1.pt")
        shard = torch.load(file, weights_only=True)
        torch.save(dict(shard, class_start=start), file)
        msg = _refused(_config(tmp_path / f"f_{name}", init_centers=folder))
        assert file in msg and words in msg, msg

    msg = _refused(_config(tmp_path / "g", teacher_network="mbf", teacher_weights=wide, distill_weight=0.5))
    assert msg.startswith("teacher_weights ") and wide in msg and "network is 'mbf'" in msg and "'small'" in msg, msg


def test_distillation_keys_that_do_not_go_together_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("distill_weight=0.5 needs teacher_network and teacher_weights")):
        Trainer(_config(tmp_path / "a", distill_weight=0.5))
    with pytest.raises(ConfigError, match="'teacher_network' = 'r51'"):
        Trainer(_config(tmp_path / "b", distill_weight=0.5, teacher_network="r51", teacher_weights="x.pt"))


# --------------------------------------------------------------------------------------------------
# e) distillation


def _held_out_images(cfg):
    images, _ = load_bin(val_bin_path(cfg, "synthetic_val"))
    return images


def _mean_cosine(student, teacher, images):
    student.eval()
    with torch.no_grad():
        s = forward_views(student, images, torch.device("cpu"), flip=False)[0]
        t = forward_views(teacher, images, torch.device("cpu"), flip=False)[0]
    return float(torch.nn.functional.cosine_similarity(s, t).mean())


@pytest.mark.parametrize("loss", ["l2", "cosine"])
def test_distillation_alone_pulls_the_student_to_the_teacher(finished, tmp_path, loss):
    cfg0, _, state, _ = finished
    teacher = build_backbone("small", DIM, state, cfg0.output)  # briefly trained, fixed
    cfg = _config(tmp_path, max_steps=40, teacher_network="small", teacher_weights=cfg0.output,
                  distill_weight=1.0, distill_loss=loss, val_targets=["synthetic_val"], verbose=0)
    trainer = Trainer(cfg)
    hook = _Snapshots()
    trainer.register_hooks([hook])
    images = _held_out_images(cfg)
    before = _mean_cosine(trainer.backbone, teacher, images)
    trainer.train()
    after = _mean_cosine(trainer.backbone, teacher, images)
    assert before < 0.8 and after > 0.9, (before, after)
    assert torch.equal(hook.centers[40], hook.centers[0])  # weight 1: the head is off


def test_a_projection_maps_the_student_to_a_wider_teacher(tmp_path):
    torch.manual_seed(3)
    teacher = get_model("small", num_features=48)
    path = str(tmp_path / "teacher.pth")
    torch.save(teacher.state_dict(), path)
    distill = dict(teacher_network="small", teacher_weights=path, teacher_embedding_size=48, distill_weight=0.5,
                   save_every=2, max_steps=4)
    full, full_losses = _train(_config(tmp_path / "full", **distill))
    assert isinstance(full.projection, torch.nn.Linear) and full.projection.weight.shape == (48, DIM)
    optimized = {id(p) for g in full.optimizer.param_groups for p in g["params"]}
    assert id(full.projection.weight) in optimized
    assert set(torch.load(os.path.join(full.output, "model.pt"), weights_only=True)) == set(
        full.backbone.state_dict())  # model.pt stays the plain backbone
    with open(os.path.join(full.output, "training.log")) as f:
        log = f.read()
    params = sum(p.numel() for p in teacher.parameters())
    assert f"teacher small from {path}: {params / 1e6:.2f}M parameters" in log and "projection 32 -> 48" in log
    # The projection is checkpointed: an interrupted run resumes to the same losses.
    interrupted = _config(tmp_path / "cut", **distill)
    _train(interrupted, stop_at=3)
    resumed, rest = _train(Config(interrupted, resume=True))
    assert sorted(rest) == [3, 4]
    for step in (3, 4):
        assert rest[step] == pytest.approx(full_losses[step], abs=1e-6), (step, rest, full_losses)
    torch.testing.assert_close(resumed.projection.weight, full.projection.weight, rtol=0, atol=1e-6)
    saved = torch.load(os.path.join(interrupted.output, "checkpoints", "step_2", "trainer.pt"), weights_only=True)
    assert set(saved["extra_modules"]) == {"projection"}  # in trainer.pt, under the manifest's checksum
    # A run without the projection cannot take that checkpoint, and says why.
    with pytest.raises(RuntimeError, match=r"holds the modules \['projection'\] beside the backbone and this run "
                                           r"has \[\]"):
        Trainer(Config(interrupted, resume=True, distill_weight=0.0, teacher_network=None, teacher_weights=None,
                       teacher_embedding_size=None))


@pytest.mark.timeout(2400)  # minutes on a loaded 2-core machine
def test_the_synthetic_main_job_still_learns_with_half_the_loss_from_a_teacher(tmp_path):
    """configs/synthetic.py as it is but for 6 of its 10 epochs (1,122 steps of 64 images on one process), with
    a fixed random teacher of another embedding size (so through the projection) at distill_weight 0.5.
    Measured: 6 epochs reach 0.968, 5 epochs 0.953. About 430 samples/s with the teacher on 2 otherwise idle CPU
    cores, so about 3 minutes (the full 10 epochs would take twice that); 16 minutes on 2 shared, busy cores."""
    torch.manual_seed(7)
    teacher = str(tmp_path / "teacher.pth")
    torch.save(get_model("small", num_features=64).state_dict(), teacher)
    cfg = load_config(os.path.join(ROOT, "configs", "synthetic.py"), [
        f"output='{tmp_path / 'out'}'", "num_workers=0", "tensorboard=False", "comm_backend='single'",
        "num_epoch=6", "verbose=100000", "teacher_network='small'", f"teacher_weights='{teacher}'",
        "teacher_embedding_size=64", "distill_weight=0.5"])
    trainer, _ = _train(cfg)
    assert trainer.projection is not None
    with open(os.path.join(cfg.output, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[0]["step"] == 0 and records[0]["accuracy"] <= 0.75, records[0]
    assert records[-1]["step"] == trainer.max_steps and records[-1]["accuracy"] >= 0.95, records


def test_resume_wins_over_init_and_says_so(finished, tmp_path):
    cfg0 = finished[0]
    cfg = _config(tmp_path, max_steps=2, save_every=1)
    first, _ = _train(cfg, stop_at=1)  # a checkpoint at step 1
    resumed = Trainer(Config(cfg, resume=True, init_backbone=cfg0.output, init_centers=cfg0.output))
    resumed.close()
    assert resumed.step == 1
    saved = torch.load(os.path.join(cfg.output, "checkpoints", "step_1", "trainer.pt"), weights_only=True)
    for key, value in resumed.backbone.state_dict().items():
        assert torch.equal(value, saved["backbone"][key]), key
    with open(os.path.join(cfg.output, "training.log")) as f:
        assert "resume wins over init_backbone and init_centers" in f.read()


# --------------------------------------------------------------------------------------------------
# f) the keys


BAD_VALUES = {
    "init_backbone": "5", "init_centers": "''", "backbone_lr_mult": "-1", "freeze_backbone_steps": "1.5",
    "teacher_network": "3", "teacher_weights": "[1]", "teacher_embedding_size": "0", "distill_loss": "'kl'",
    "distill_weight": "1.5",
}


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_a_malformed_value_is_a_config_error_naming_the_key(key):
    with pytest.raises(ConfigError, match=re.escape(f"config key {key!r} = ")):
        load_config(os.path.join(ROOT, "configs", "synthetic.py"), [f"{key}={BAD_VALUES[key]}"])


def test_the_defaults_are_plain_training():
    cfg = load_config(os.path.join(ROOT, "configs", "synthetic.py"))
    assert {k: cfg[k] for k in BAD_VALUES} == dict(
        init_backbone=None, init_centers=None, backbone_lr_mult=1.0, freeze_backbone_steps=0, teacher_network=None,
        teacher_weights=None, teacher_embedding_size=None, distill_loss="l2", distill_weight=0.0)


@pytest.mark.parametrize("name", ["finetune_r50_from_model_zoo.py", "distill_r18_from_r100.py"])
def test_the_example_configs_load(name):
    cfg = load_config(os.path.join(ROOT, "configs", name))
    if name.startswith("finetune"):
        assert cfg.init_backbone.endswith("backbone.pth") and cfg.freeze_backbone_steps > 0
        assert cfg.backbone_lr_mult < 1 and cfg.network == "r50"
    else:
        assert (cfg.network, cfg.teacher_network) == ("r18", "r100") and 0 < cfg.distill_weight < 1
    assert not math.isnan(cfg.lr)
