"""init_centers with sub-center ArcFace (num_subcenters K): shards of K rows per identity merged in class
order and re-split by identity for any world size, a single center per identity expanded to K sub-centers,
and a K that fits neither refused with the file and both values."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from partialfc.engine import checkpointer as checkpoint
from partialfc.engine.init_weights import (SUBCENTER_NOISE, InitWeightsError, load_center_shard,
                                           read_center_shards)
from partialfc.head.partial_fc import partition_classes
from partialfc.tools.reshard import main as reshard_main
from test_training import _tiny_config, _train

K, DIM = 3, 6


def _write(folder, table, world_size, k, layout="final"):
    """``table`` [C * k, DIM] as the shards of ``world_size`` ranks: the final ``softmax_fc_rank_<r>.pt`` files
    of a run (no num_local), a checkpoint's ``rank_<r>.pt`` (with num_local) or arcface_torch's
    ``softmax_fc_gpu_<r>.pt`` (a bare state dict, k = 1)."""
    os.makedirs(folder, exist_ok=True)
    classes = table.shape[0] // k
    for rank in range(world_size):
        start, num = partition_classes(classes, rank, world_size)
        rows = table[start * k:(start + num) * k].clone()
        if layout == "final":
            state = dict(weight=rows, class_start=start, num_classes=classes, world_size=world_size,
                         num_subcenters=k)
            name = f"softmax_fc_rank_{rank}.pt"
        elif layout == "checkpoint":
            state = dict(weight=rows, class_start=start, num_local=num, num_subcenters=k)
            name = f"rank_{rank}.pt"
        else:
            state, name = dict(weight=rows), f"softmax_fc_gpu_{rank}.pt"
        torch.save(state, os.path.join(folder, name))
    return str(folder)


def _whole(folder, classes, world_size, k, seed=0):
    """The table ``world_size`` ranks load, concatenated in rank order."""
    return torch.cat([load_center_shard(folder, classes, DIM, r, world_size, num_subcenters=k, seed=seed)
                      for r in range(world_size)])


def test_a_trained_run_with_subcenters_starts_another_on_any_world_size(tmp_path):
    cfg = _tiny_config(tmp_path / "run", save_every=2, max_steps=2, num_subcenters=K)
    trainer, _ = _train(cfg)
    table = trainer.pfc.weight.detach().clone()  # [16 * K, 32]
    assert table.shape == (16 * K, 32)
    step = checkpoint.step_dir(cfg.output, 2)
    assert reshard_main(["merge", step, str(tmp_path / "merged.pt")]) == 0
    assert reshard_main(["split", str(tmp_path / "merged.pt"), "--world-size", "3", str(tmp_path / "three")]) == 0
    three = checkpoint.step_dir(str(tmp_path / "three"), 2)  # identities 6 + 5 + 5, K rows each
    for source in (cfg.output, step, three, os.path.join(three, "rank_2.pt")):
        shards, total, dim = read_center_shards(source)
        assert (total, dim) == (16, 32) and all(s["k"] == K for s in shards)
        for world_size in (1, 2, 5):
            for rank in range(world_size):
                start, num = partition_classes(16, rank, world_size)
                got = load_center_shard(source, 16, 32, rank, world_size, num_subcenters=K)
                # identity c's K rows stay together: rows c*K .. c*K+K-1 of the table
                assert torch.equal(got, table[start * K:(start + num) * K]), (source, world_size, rank)


@pytest.mark.parametrize("layout", ["final", "checkpoint"])
def test_uneven_shards_of_k_rows_are_merged_in_class_order(tmp_path, layout):
    table = torch.randn(37 * K, DIM)
    for written in (1, 2, 4):
        folder = _write(tmp_path / f"w{written}", table, written, K, layout)
        for world_size in (1, 3, 4):
            assert torch.equal(_whole(folder, 37, world_size, K), table), (written, world_size)
        assert load_center_shard(folder, 37, DIM, 3, 4, num_subcenters=K).shape == (9 * K, DIM)


def test_another_number_of_subcenters_is_refused_with_the_file_and_both_values(tmp_path):
    folder = _write(tmp_path / "k3", torch.randn(10 * K, DIM), 2, K)
    first = os.path.join(folder, "softmax_fc_rank_0.pt")
    for run_k in (1, 2, 4):
        with pytest.raises(InitWeightsError, match=(rf"init_centers {first}: 3 sub-centers per identity in the files, "
                                                    rf"{run_k} in this run \(num_subcenters\)")):
            load_center_shard(folder, 10, DIM, 0, 1, num_subcenters=run_k)
    # The class count is by identity: 10 identities of 3 rows are not 30 classes.
    with pytest.raises(InitWeightsError, match="10 classes in the files, 30 in this run"):
        load_center_shard(folder, 30, DIM, 0, 1, num_subcenters=K)


def test_shards_that_disagree_on_their_rows_are_named(tmp_path):
    mixed = tmp_path / "mixed"
    _write(mixed, torch.randn(10 * K, DIM), 2, K, "checkpoint")
    torch.save(dict(weight=torch.randn(5, DIM), class_start=5, num_local=5, num_subcenters=1), mixed / "rank_1.pt")
    with pytest.raises(InitWeightsError, match=r"rank_1.pt \(classes \[5, 10\)\): 1 sub-centers per identity, but "
                                               r".*rank_0.pt has 3"):
        read_center_shards(str(mixed))
    odd = tmp_path / "odd"
    os.makedirs(odd)
    torch.save(dict(weight=torch.randn(7, DIM), class_start=0, num_classes=2, world_size=1, num_subcenters=K),
               odd / "softmax_fc_rank_0.pt")
    with pytest.raises(InitWeightsError, match=r"softmax_fc_rank_0.pt: weight holds 7 rows, not a multiple of its "
                                               r"num_subcenters 3"):
        read_center_shards(str(odd))
    torn = tmp_path / "torn"
    os.makedirs(torn)
    torch.save(dict(weight=torch.randn(9, DIM), class_start=0, num_local=4, num_subcenters=K), torn / "rank_0.pt")
    with pytest.raises(InitWeightsError, match=r"rank_0.pt: num_local 4 in the file, but its weight holds 9 rows "
                                               r"\(3 identities x num_subcenters 3\)"):
        read_center_shards(str(torn))


@pytest.mark.parametrize("layout", ["final", "arcface_torch"])
def test_one_center_per_identity_starts_k_subcenters_near_it_the_same_on_every_world_size(tmp_path, layout):
    classes = 5000  # more than one noise block (4096 identities), so block edges fall inside ranks' ranges
    centers = torch.randn(classes, DIM) * (0.5 + torch.rand(classes, 1))
    folder = _write(tmp_path / "one", centers, 2, 1, layout)
    whole = _whole(folder, classes, 1, K).view(classes, K, DIM)
    # Sub-center 0 is the center itself; the others are near it and not equal to it or to each other.
    assert torch.equal(whole[:, 0], centers)
    for k in range(1, K):
        cos = F.cosine_similarity(whole[:, k], centers, dim=1)
        assert bool((cos < 1).all()) and bool((cos > math.cos(6 * SUBCENTER_NOISE)).all())
        deviation = (whole[:, k] - centers) / (centers.norm(dim=1, keepdim=True) / DIM ** 0.5)  # ~ N(0, noise^2)
        assert deviation.std().item() == pytest.approx(SUBCENTER_NOISE, rel=0.05)
        assert abs(deviation.mean().item()) < 0.05 * SUBCENTER_NOISE
    assert bool((whole[:, 1] != whole[:, 2]).any(dim=1).all())
    # Noise of different identities and different sub-centers is independent.
    dev = (whole[:, 1:] - centers[:, None]).flatten(1)  # [C, (K-1)*D]
    assert abs(torch.corrcoef(torch.stack([dev[:-1].flatten(), dev[1:].flatten()]))[0, 1].item()) < 0.05
    # The noise depends on the seed and the identity, not on the split: every world size starts from one table.
    for world_size in (2, 3, 7):
        assert torch.equal(_whole(folder, classes, world_size, K).view(classes, K, DIM), whole), world_size
    other_seed = _whole(folder, classes, 1, K, seed=1).view(classes, K, DIM)
    assert torch.equal(other_seed[:, 0], centers) and not torch.equal(other_seed, whole)
    # K = 1 files into a K = 1 run are taken as they are.
    assert torch.equal(_whole(folder, classes, 3, 1), centers)


def test_a_k3_run_starts_from_another_k3_runs_centers_in_the_trainer(tmp_path):
    # The trainer passes its num_subcenters (and seed) to the loader: a K = 3 run with init_centers holds the
    # source run's table bit for bit; a K = 1 source starts K sub-centers with row 0 the center itself.
    from partialfc.train import Trainer

    source_cfg = _tiny_config(tmp_path / "source", save_every=2, max_steps=2, num_subcenters=K)
    source, _ = _train(source_cfg)
    table = source.pfc.weight.detach().clone()
    trainer = Trainer(_tiny_config(tmp_path / "tuned", max_steps=2, num_subcenters=K, init_centers=source_cfg.output))
    trainer.close()
    assert torch.equal(trainer.pfc.weight.detach(), table)
    plain_cfg = _tiny_config(tmp_path / "plain", save_every=2, max_steps=2)
    plain, _ = _train(plain_cfg)
    trainer = Trainer(_tiny_config(tmp_path / "from_plain", max_steps=2, num_subcenters=K,
                                   init_centers=plain_cfg.output))
    trainer.close()
    assert torch.equal(trainer.pfc.weight.detach().view(-1, K, trainer.pfc.weight.shape[1])[:, 0],
                       plain.pfc.weight.detach())
