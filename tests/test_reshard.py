"""Resharding: the sampler's global batches and offsets, merge/split of checkpoints, the arcface_torch import,
resume of a checkpoint written by another number of ranks, and checkpoint saves that fail part way."""
import errno
import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

from partialfc import PartialFC, SparseSGD
from partialfc.comm import Communicator
from partialfc.config import Config
from partialfc.data import ShardedSampler
from partialfc.engine import checkpointer as checkpoint
from partialfc.engine import reshard
from partialfc.engine.checkpointer import Checkpointer
from partialfc.fileio import AtomicWriteError
from partialfc.head.partial_fc import partition_classes
from partialfc.tools.reshard import main as reshard_main
from partialfc.train import Trainer
from test_training import _tiny_config, _train


# ----------------------------------------------------------------------------------------------------------
# The sampler

def _global_batches(num_samples, size, batch, epoch=3, start=0, seed=7):
    """The global batches (each the concatenation of the ranks' batches) of one epoch from ``start``."""
    per_rank = []
    for rank in range(size):
        sampler = ShardedSampler(num_samples, rank, size, batch, seed)
        sampler.set_epoch(epoch, start_sample=start)
        ids = list(sampler)
        assert len(ids) == len(sampler)
        per_rank.append([ids[i:i + batch] for i in range(0, len(ids), batch)])
    return [sum((per_rank[r][k] for r in range(size)), []) for k in range(len(per_rank[0]))]


def test_global_batches_do_not_depend_on_the_split_into_ranks():
    perm = np.random.default_rng([7, 3]).permutation(100).tolist()
    expected = [perm[i:i + 24] for i in range(0, 96, 24)]  # 4 whole global batches of 24, 4 images sit out
    for size, batch in [(1, 24), (2, 12), (3, 8)]:
        assert _global_batches(100, size, batch) == expected, (size, batch)


@pytest.mark.parametrize("start", [48, 20])
def test_resume_at_another_world_size_neither_skips_nor_repeats(start):
    """2 ranks x 12 consume ``start`` images of the epoch, then 3 ranks x 8 take over at that sample count:
    together they see the permutation's images in order, each once (20 is not a multiple of 24: the
    resumed batches start at 20, and the shorter tail sits out)."""
    perm = np.random.default_rng([7, 3]).permutation(100).tolist()
    before = [i for b in _global_batches(100, 2, 12)[:start // 24] for i in b] + perm[start // 24 * 24:start]
    after = [i for b in _global_batches(100, 3, 8, start=start) for i in b]
    seen = before + after
    assert len(after) == (100 - start) // 24 * 24
    assert seen == perm[:len(seen)] and len(set(seen)) == len(seen)


def test_sampler_offset_outside_the_epoch_is_an_error():
    sampler = ShardedSampler(100, 0, 2, 12)
    with pytest.raises(ValueError, match=r"start_sample 101 is outside \[0, 100\]"):
        sampler.set_epoch(0, start_sample=101)
    sampler.set_epoch(0, start_sample=96)
    assert len(sampler) == 0 and list(sampler) == []


# ----------------------------------------------------------------------------------------------------------
# Merge and split

def _run_checkpoint(tmp_path, **overrides):
    """A 1-rank run of 4 steps with checkpoints at steps 2 and 4; its step-4 folder."""
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=4, **overrides)
    _train(cfg)
    return cfg, checkpoint.step_dir(cfg.output, 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_split_then_merge_gives_the_same_table_and_states(tmp_path, optimizer):
    cfg, folder = _run_checkpoint(tmp_path, optimizer=optimizer, lr=0.01)
    shard = checkpoint.load(os.path.join(folder, "rank_0.pt"))
    assert reshard_main(["merge", folder, str(tmp_path / "merged.pt")]) == 0
    merged = reshard.load_merged(str(tmp_path / "merged.pt"))
    assert torch.equal(merged["weight"], shard["weight"])
    keys = ["momentum_buffer"] if optimizer == "sgd" else ["exp_avg", "exp_avg_sq", "row_step"]
    assert sorted(merged["optimizer_rows"]) == keys
    for key in keys:
        assert torch.equal(merged["optimizer_rows"][key], shard["pfc_optimizer"]["state"][0][key])
    assert reshard_main(["split", str(tmp_path / "merged.pt"), "--world-size", "3", str(tmp_path / "three")]) == 0
    three = checkpoint.step_dir(str(tmp_path / "three"), 4)
    assert checkpoint.latest_complete(str(tmp_path / "three")) == three  # sealed, checksums match
    for rank in range(3):
        part = checkpoint.load(os.path.join(three, f"rank_{rank}.pt"))
        start, num = partition_classes(16, rank, 3)
        assert (part["class_start"], part["num_local"]) == (start, num)
        assert torch.equal(part["weight"], shard["weight"][start:start + num])
    again = reshard.merge(three)
    assert again["source_world_size"] == 3
    assert torch.equal(again["weight"], merged["weight"])
    for key in keys:
        assert again["optimizer_rows"][key].dtype == merged["optimizer_rows"][key].dtype
        assert torch.equal(again["optimizer_rows"][key], merged["optimizer_rows"][key])
    assert again["param_groups"] == merged["param_groups"]


def _losses_after_resume(cfg):
    resumed, rest = _train(Config(cfg, resume=True))
    with open(os.path.join(cfg.output, "training.log")) as f:
        return resumed, rest, f.read()


def test_a_checkpoint_of_three_ranks_resumes_on_one_with_the_same_losses(tmp_path):
    """A 1-rank run's step-3 checkpoint split for 3 ranks, then resumed on 1: the three shards are merged back
    and the run continues with the uninterrupted run's losses (sample_rate=1: the restarted class sampler is
    not drawn from)."""
    full_cfg = _tiny_config(tmp_path / "a", save_every=3, sample_rate=1.0)
    _, full = _train(full_cfg)
    cut = _tiny_config(tmp_path / "b", save_every=3, sample_rate=1.0)
    _train(cut, stop_at=4)
    merged = reshard.merge(checkpoint.step_dir(cut.output, 3))
    moved = Config(cut, output=str(tmp_path / "moved"))
    reshard.split(merged, 3, moved.output, log=lambda m: None)
    resumed, rest, log = _losses_after_resume(moved)
    assert sorted(rest) == [4, 5, 6]
    for step in (4, 5, 6):
        assert rest[step] == pytest.approx(full[step], abs=1e-6), (step, rest, full)
    assert "re-split 16 classes from 3 ranks to 1: rank 0 [0, 16) <- rank_0.pt[0:6] + rank_1.pt[0:5] + " \
           "rank_2.pt[0:5]" in log


def test_resume_on_another_world_size_with_another_global_batch_is_refused(tmp_path):
    cfg, folder = _run_checkpoint(tmp_path)
    moved = Config(cfg, output=str(tmp_path / "moved"), resume=True)
    reshard.split(reshard.merge(folder), 2, moved.output, log=lambda m: None)
    with pytest.raises(RuntimeError, match=r"the global batch is 16 \(2 ranks x batch_size 8\) in the checkpoint "
                                           r"and 32 \(1 ranks x batch_size 32\) in this run; resume with "
                                           r"batch_size=16"):
        Trainer(Config(moved, batch_size=32))


def test_resplit_restarts_the_class_sampler_from_the_seed_rule(tmp_path):
    cfg, folder = _run_checkpoint(tmp_path, sample_rate=0.5)
    moved = Config(cfg, output=str(tmp_path / "moved"), resume=True)
    reshard.split(reshard.merge(folder), 2, moved.output, log=lambda m: None)
    trainer = Trainer(moved)
    trainer.close()
    expected = torch.Generator().manual_seed(reshard.derived_seed(cfg.seed, 0, 4, reshard.SAMPLER)).get_state()
    assert torch.equal(trainer.pfc.sampler.get_state(), expected)
    assert trainer.checkpointer.resumed_at == (0, 4 * 16)  # 4 global batches of 16 into epoch 0 (128 images)


def test_old_checkpoint_without_a_sample_count_resumes_at_its_batch(tmp_path):
    cfg, folder = _run_checkpoint(tmp_path)
    state = checkpoint.load(os.path.join(folder, "trainer.pt"))
    del state["sample_in_epoch"], state["global_batch"]
    state["batch_in_epoch"] = 3
    checkpoint.save_atomic(state, os.path.join(folder, "trainer.pt"))
    checkpoint.write_manifest(folder, 1, 4)
    trainer = Trainer(Config(cfg, resume=True))
    trainer.close()
    assert trainer.checkpointer.resumed_at == (0, 3 * 16)


# ----------------------------------------------------------------------------------------------------------
# Bad shards

def _fake_checkpoint(folder, ranges, dims=None, num_classes=None):
    os.makedirs(folder)
    for rank, (start, num) in enumerate(ranges):
        dim = (dims or {}).get(rank, 4)
        checkpoint.save_atomic(dict(weight=torch.zeros(num, dim), class_start=start, num_local=num,
                                    pfc_optimizer=None), os.path.join(folder, f"rank_{rank}.pt"))
    total = num_classes if num_classes is not None else sum(n for _, n in ranges)
    checkpoint.save_atomic(dict(step=1, world_size=len(ranges), num_classes=total, config="{}"),
                           os.path.join(folder, "trainer.pt"))
    return folder


@pytest.mark.parametrize("ranges,dims,message", [
    ([(0, 5), (6, 4)], None, r"rank_1.pt \(classes \[6, 10\)\): classes \[5, 6\) are in no shard"),
    ([(0, 5), (4, 6)], None, r"rank_1.pt \(classes \[4, 10\)\): overlaps the classes up to 5"),
    ([(0, 5), (5, 5)], {1: 8}, r"rank_1.pt \(classes \[5, 10\)\): embedding size 8, but .*rank_0.pt has 4"),
])
def test_bad_shards_are_named_with_their_range(tmp_path, ranges, dims, message):
    folder = _fake_checkpoint(str(tmp_path / "step_1"), ranges, dims, num_classes=10)
    with pytest.raises(reshard.ReshardError, match=message):
        reshard.merge(folder)


def test_missing_rank_file_is_named(tmp_path, capsys):
    folder = _fake_checkpoint(str(tmp_path / "step_1"), [(0, 4), (4, 3), (7, 3)])
    os.remove(os.path.join(folder, "rank_1.pt"))
    assert reshard_main(["merge", folder, str(tmp_path / "m.pt")]) == 1
    assert "rank file(s) rank_1.pt missing (found ranks [0, 2])" in capsys.readouterr().err


def test_shards_ending_before_the_class_count_are_an_error(tmp_path):
    folder = _fake_checkpoint(str(tmp_path / "step_1"), [(0, 4), (4, 3)], num_classes=10)
    with pytest.raises(reshard.ReshardError, match=r"rank_1.pt \(classes \[4, 7\)\): the shards end at class 7, "
                                                   r"but there are 10 classes"):
        reshard.merge(folder)


# ----------------------------------------------------------------------------------------------------------
# arcface_torch runs

def _arcface_run(run_dir, backbone, num_classes=16, world_size=3, dim=32, with_momentum=True, layout="ckpt",
                 bad=None):
    """An arcface_torch run folder as its train_v2.py writes it. PartialFC_V2 on rank r of W holds classes
    [start, start + num_local) of partition_classes(num_classes, r, W): contiguous, the first
    num_classes % W ranks one longer. Its optimizer is one SGD over two groups, the backbone's parameters then
    the Partial FC weight, so the weight's momentum is the state of the last parameter index."""
    os.makedirs(run_dir)
    gen = torch.Generator().manual_seed(3)
    weights, momenta = [], []
    n_params = len(list(backbone.parameters()))
    for rank in range(world_size):
        _, num = partition_classes(num_classes, rank, world_size)
        d = dim + (1 if bad == "dim" and rank == 1 else 0)
        weight = torch.randn(num + (1 if bad == "rows" and rank == 2 else 0), d, generator=gen)
        momentum = torch.randn(weight.shape, generator=gen)
        weights.append(weight)
        momenta.append(momentum)
        fc = {"weight": weight}
        if layout == "ckpt":
            state = {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(backbone.parameters())}
            if with_momentum:
                state[n_params] = {"momentum_buffer": momentum}
            groups = [{"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "params": list(range(n_params))},
                      {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "params": [n_params]}]
            torch.save({"epoch": 2, "global_step": 7, "state_dict_backbone": backbone.state_dict(),
                        "state_dict_softmax_fc": fc, "state_optimizer": {"state": state, "param_groups": groups},
                        "state_lr_scheduler": {"last_epoch": 7}}, os.path.join(run_dir, f"checkpoint_gpu_{rank}.pt"))
        else:
            torch.save(fc, os.path.join(run_dir, f"softmax_fc_gpu_{rank}.pt"))
    if layout == "final":
        torch.save(backbone.state_dict(), os.path.join(run_dir, "model.pt"))
    return torch.cat(weights) if bad is None else None, torch.cat(momenta) if bad is None else None


def test_an_arcface_torch_run_resumes_here(tmp_path):
    cfg = _tiny_config(tmp_path, resume=True, output=str(tmp_path / "imported"), max_steps=8)
    source = Trainer(Config(cfg, output=str(tmp_path / "source"), resume=False))
    source.close()
    with torch.no_grad():
        for p in source.backbone.parameters():
            p.add_(0.5)
    weight, momentum = _arcface_run(str(tmp_path / "run"), source.backbone)
    assert reshard_main(["import-arcface-torch", str(tmp_path / "run"), cfg.output, "--world-size", "1"]) == 0
    trainer = Trainer(cfg)
    trainer.close()
    assert trainer.step == 7 and trainer.epoch == 2
    assert torch.equal(trainer.pfc.weight.detach(), weight)
    assert torch.equal(trainer.pfc_optimizer.momentum_buffer(), momentum)
    for (name, a), b in zip(trainer.backbone.state_dict().items(), source.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    factor = trainer.schedulers[0].lr_lambdas[0]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * factor(7))
    trainer = Trainer(cfg)  # and it trains on from there
    trainer.train()
    assert trainer.step == 8


def test_an_arcface_torch_final_model_imports_with_zero_momentum(tmp_path, capsys):
    source = nn.Sequential(nn.Linear(3, 2))
    weight, _ = _arcface_run(str(tmp_path / "run"), source, num_classes=10, world_size=4, dim=8, layout="final")
    reshard.import_arcface_torch(str(tmp_path / "run"), str(tmp_path / "out"), 2)
    assert "the class centers' momentum starts at zero: model.pt and softmax_fc_gpu_<r>.pt hold no optimizer " \
           "state" in capsys.readouterr().out
    merged = reshard.merge(str(tmp_path / "out"))
    assert torch.equal(merged["weight"], weight) and merged["optimizer_rows"] == {}
    assert merged["trainer"]["step"] == 0 and torch.equal(merged["trainer"]["backbone"]["0.weight"],
                                                          source[0].weight)


@pytest.mark.parametrize("bad,message", [
    ("missing", r"checkpoint_gpu_1.pt missing \(found ranks \[0, 2\]\); every rank's file is needed"),
    ("dim", r"checkpoint_gpu_1.pt: embedding size 33, but .*checkpoint_gpu_0.pt has 32"),
    ("rows", r"checkpoint_gpu_1.pt: holds 5 rows, but PartialFC_V2 puts classes \[6, 12\) on rank 1: 3 shards of "
             r"17 classes hold \[6, 6, 5\] rows, these files hold \[6, 5, 6\]"),
])
def test_bad_arcface_torch_runs_are_named(tmp_path, bad, message):
    _arcface_run(str(tmp_path / "run"), nn.Linear(3, 2), bad=None if bad == "missing" else bad)
    if bad == "missing":
        os.remove(tmp_path / "run" / "checkpoint_gpu_1.pt")
    with pytest.raises(reshard.ReshardError, match=message):
        reshard.import_arcface_torch(str(tmp_path / "run"), str(tmp_path / "out"), 1, log=lambda m: None)


# ----------------------------------------------------------------------------------------------------------
# Saves that fail part way, on two in-process ranks

class _Group:
    def __init__(self, size):
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=20)  # a rank left waiting breaks it instead of hanging


class _ThreadComm(Communicator):
    """One rank of an in-process group whose collectives meet at a barrier."""

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def allgather(self, tensor):
        self.group.barrier.wait()
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        out = torch.cat(self.group.slots)
        self.group.barrier.wait()
        return out

    def allreduce(self, tensor, op="sum"):
        stacked = self.allgather(tensor[None])
        return stacked.sum(0) if op == "sum" else stacked.max(0).values

    def barrier(self):
        self.group.barrier.wait()


def _checkpointers(output, size=2):
    group = _Group(size)
    out = []
    for rank in range(size):
        comm = _ThreadComm(group, rank)
        backbone = nn.Linear(2, 2)
        optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
        pfc = PartialFC(4, 10, comm=comm)
        out.append(Checkpointer(output, comm, Config(batch_size=4, network="x"), backbone=backbone,
                                optimizer=optimizer, schedulers=[], scaler=None, pfc=pfc,
                                pfc_optimizer=SparseSGD(pfc, lr=0.1), device=torch.device("cpu"),
                                log=lambda m: None))
    return out


def _save_on_both(checkpointers, step):
    errors = [None] * len(checkpointers)

    def run(rank):
        try:
            checkpointers[rank].save(step, 0, 0)
        except BaseException as exc:  # noqa: B902 - reported to the test
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(checkpointers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def _failing_save(monkeypatch, suffix):
    real = checkpoint.save_atomic

    def save(obj, path):
        if path.endswith(suffix):
            raise AtomicWriteError(errno.ENOSPC, f"no space left on device while writing {path}", path)
        real(obj, path)
    monkeypatch.setattr(checkpoint, "save_atomic", save)


def test_a_rank_that_cannot_write_its_shard_stops_every_rank(tmp_path, monkeypatch):
    _failing_save(monkeypatch, "rank_1.pt")
    errors = _save_on_both(_checkpointers(str(tmp_path)), 3)
    folder = checkpoint.step_dir(str(tmp_path), 3)
    assert isinstance(errors[1], AtomicWriteError) and "no space left on device" in str(errors[1])
    assert isinstance(errors[0], RuntimeError)
    assert str(errors[0]) == f"checkpoint {folder} not sealed: rank(s) [1] could not write their file (see their log)"
    assert not os.path.exists(os.path.join(folder, checkpoint.MANIFEST))


def test_rank_zero_failing_on_trainer_file_stops_the_others(tmp_path, monkeypatch):
    _failing_save(monkeypatch, "trainer.pt")
    errors = _save_on_both(_checkpointers(str(tmp_path)), 3)
    folder = checkpoint.step_dir(str(tmp_path), 3)
    assert isinstance(errors[0], AtomicWriteError)
    assert str(errors[1]) == f"checkpoint {folder} not sealed: rank(s) [0] could not write trainer.pt (see their log)"


def test_saving_a_step_again_drops_its_old_manifest_first(tmp_path, monkeypatch):
    assert _save_on_both(_checkpointers(str(tmp_path)), 5) == [None, None]
    folder = checkpoint.step_dir(str(tmp_path), 5)
    assert checkpoint.latest_complete(str(tmp_path)) == folder
    _failing_save(monkeypatch, "trainer.pt")  # the second save of step 5 rewrites the shards, then fails
    errors = _save_on_both(_checkpointers(str(tmp_path)), 5)
    assert isinstance(errors[0], AtomicWriteError) and isinstance(errors[1], RuntimeError)
    assert not os.path.exists(os.path.join(folder, checkpoint.MANIFEST))
    assert checkpoint.latest_complete(str(tmp_path)) is None


def test_latest_complete_checks_the_checksums(tmp_path):
    assert _save_on_both(_checkpointers(str(tmp_path)), 2) == [None, None]
    assert _save_on_both(_checkpointers(str(tmp_path)), 4) == [None, None]
    path = os.path.join(checkpoint.step_dir(str(tmp_path), 4), "rank_1.pt")
    with open(path, "r+b") as f:  # same size, other bytes
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x7f" * 64)
    assert checkpoint.latest_complete(str(tmp_path)) == checkpoint.step_dir(str(tmp_path), 2)


def test_tool_errors_name_the_input(tmp_path, capsys):
    assert reshard_main(["split", str(tmp_path / "nothing.pt"), "--world-size", "2", str(tmp_path / "o")]) == 1
    assert f"{tmp_path / 'nothing.pt'}: cannot load" in capsys.readouterr().err
