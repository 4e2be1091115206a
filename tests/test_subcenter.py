"""Sub-center ArcFace in the Partial FC head: K rows per identity, the identity's cosine the max over them.

The head is checked against dense float64 models written here and differentiated by autograd: all C*K
centers, torch.max over each identity's K cosines, then each margin's loss over the C identity cosines.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from partialfc import PartialFC, SparseSGD
from partialfc.comm import Communicator
from partialfc.config import Config
from partialfc.engine import checkpointer as checkpoint
from partialfc.engine import reshard
from partialfc.tools.reshard import main as reshard_main
from test_training import _tiny_config, _train

K = 3
FIXED = {"arcface": (64.0, 1.0, 0.5, 0.0), "cosface": (64.0, 1.0, 0.0, 0.35), "combined": (32.0, 0.9, 0.4, 0.15)}


def identity_cos(x, w, k):
    """[B, C]: each identity's largest cosine over its k rows (w [C*k, D], identity c at rows c*k .. c*k+k-1)."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()  # [B, C*k]
    return cos.view(x.shape[0], -1, k).max(dim=2).values


def dense_fixed(cos, y, s, m1, m2, m3, filter_threshold=0.0):
    rows = torch.arange(y.shape[0])
    target = cos[rows, y]
    angle = m1 * torch.acos(target.clamp(-1, 1)) + m2
    margin = torch.where(angle <= math.pi, torch.cos(angle) - m3, target - m3 - m2 * math.sin(m2))
    onehot = F.one_hot(y, cos.shape[1]).bool()
    logits = cos
    if filter_threshold > 0:
        logits = logits * (~((cos > filter_threshold) & ~onehot)).to(cos.dtype)
    return F.cross_entropy(s * torch.where(onehot, margin[:, None], logits), y)


def dense_adaface(cos, norms, y, state, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    norms = norms.clip(0.001, 100).detach()
    with torch.no_grad():
        state["mean"] = norms.mean() * t_alpha + (1 - t_alpha) * state["mean"]
        state["std"] = norms.std() * t_alpha + (1 - t_alpha) * state["std"]
    ms = ((norms - state["mean"]) / (state["std"] + eps) * h).clip(-1, 1)
    cos = cos.clamp(-1 + eps, 1 - eps)
    onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
    theta = torch.clip(cos.acos() + onehot * (-m * ms)[:, None], min=eps, max=math.pi - eps)
    return F.cross_entropy(s * (theta.cos() - onehot * (m + m * ms)[:, None]), y)


def dense_curricular(cos, y, state, m=0.5, s=64.0, t_alpha=0.01):
    cos = cos.clamp(-1, 1)
    target = cos[torch.arange(y.shape[0]), y][:, None]
    cos_m = target * math.cos(m) - torch.sqrt(1.0 - target ** 2) * math.sin(m)
    hard = (cos > cos_m).detach()
    final = torch.where(target > math.cos(math.pi - m), cos_m, target - math.sin(math.pi - m) * m)
    with torch.no_grad():
        state["t"] = target.mean() * t_alpha + (1 - t_alpha) * state["t"]
    logits = torch.where(hard, cos * (state["t"] + cos), cos).scatter(1, y[:, None], final)
    return F.cross_entropy(s * logits, y)


C, D, B = 23, 10, 14
START = {"adaface": {"mean": 3.0, "std": 0.6}, "curricularface": {"t": 0.3}}
HEAD_KEYS = {"adaface": ("adaface_batch_mean", "adaface_batch_std"), "curricularface": ("curricular_t",)}
CASES = [(m, 0.0) for m in FIXED] + [("arcface", 0.2), ("combined", 0.2), ("adaface", 0.0), ("curricularface", 0.0)]


def head(margin, filter_threshold=0.0, sample_rate=1.0, use_ext=True, **kw):
    return PartialFC(D, C, sample_rate, FIXED.get(margin, margin), comm=Communicator(),
                     interclass_filtering_threshold=filter_threshold, use_ext=use_ext, **kw).double()


def batch(step, weight):
    """Embeddings near one of their identity's sub-centers (which one varies), near the opposite, or anywhere."""
    g = torch.Generator().manual_seed(50 + step)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    near = F.normalize(weight[y * K + torch.randint(0, K, (B,), generator=g)], dim=1)
    x[:5] = near[:5] + 0.1 * x[:5]
    x[5:7] = -near[5:7] + 0.05 * x[5:7]
    return F.normalize(x, dim=1) * (0.5 + 5 * torch.rand(B, 1, generator=g, dtype=torch.float64)), y


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("margin,filter_threshold", CASES)
def test_head_with_subcenters_equals_dense_model(margin, filter_threshold, use_ext):
    torch.manual_seed(0)
    pfc = head(margin, filter_threshold, use_ext=use_ext, num_subcenters=K)
    assert pfc.weight.shape == (C * K, D)
    pfc.weight.data = torch.randn(C * K, D, dtype=torch.float64)
    state = {k: torch.tensor(v, dtype=torch.float64) for k, v in START.get(margin, {}).items()}
    if state:
        pfc.load_head_state({key: state[k] for key, k in zip(HEAD_KEYS[margin], state)})
    for step in range(3):
        x, y = batch(step, pfc.weight.detach())
        x.requires_grad_()
        loss = pfc(x, y)
        loss.backward()
        x_ref, w_ref = x.detach().clone().requires_grad_(), pfc.weight.detach().clone().requires_grad_()
        cos = identity_cos(x_ref, w_ref, K)
        if margin == "adaface":
            ref = dense_adaface(cos, x_ref.norm(dim=1), y, state)
        elif margin == "curricularface":
            ref = dense_curricular(cos, y, state)
        else:
            ref = dense_fixed(cos, y, *FIXED[margin], filter_threshold)
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), abs=1e-10), step
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)
        # Every one of the C*K rows: the argmax sub-centers get their gradient, the others none.
        center = torch.zeros_like(w_ref)
        center[pfc.sampled_index] = pfc.center_grad.rows()
        torch.testing.assert_close(center, w_ref.grad, atol=1e-10, rtol=1e-8)
        assert (w_ref.grad.view(C, K, D).abs().sum(dim=2) > 0).sum(dim=1).max() <= B
        with torch.no_grad():
            pfc.weight[pfc.sampled_index] -= 0.5 * pfc.center_grad.rows()


@pytest.mark.parametrize("margin", ["adaface", "curricularface"])
def test_adaptive_margins_with_filtering_kernels_follow_reference(margin):
    heads = [head(margin, 0.2, use_ext=e, num_subcenters=K) for e in (True, False)]
    weight = torch.randn(C * K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for pfc in heads:
        pfc.weight.data = weight.clone()
    x, y = batch(0, weight)
    out = []
    for pfc in heads:
        xi = x.clone().requires_grad_()
        loss = pfc(xi, y)
        loss.backward()
        out.append((loss.detach(), xi.grad, pfc.center_grad.rows()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_sampling_takes_all_k_rows_of_each_sampled_identity_and_sgd_moves_exactly_them():
    torch.manual_seed(1)
    pfc = PartialFC(D, 60, 0.2, "arcface", comm=Communicator(), num_subcenters=K).double()
    opt = SparseSGD(pfc, lr=0.5, momentum=0.9, weight_decay=5e-4)
    for step in range(3):
        x, y = torch.randn(B, D, dtype=torch.float64), torch.randint(0, 60, (B,))
        before = pfc.weight.detach().clone()
        pfc(x, y).backward()
        ids, rows = pfc.center_grad.identities, pfc.sampled_index
        assert ids.numel() == max(12, torch.unique(y).numel()) and bool(torch.isin(y, ids).all())
        assert torch.equal(rows, (ids[:, None] * K + torch.arange(K)).flatten())
        # The gradient is the dense model's over the sampled identities (all their K rows), labels remapped.
        w_ref = before[rows].clone().requires_grad_()
        ref = dense_fixed(identity_cos(x, w_ref, K), torch.searchsorted(ids, y), *FIXED["arcface"])
        ref.backward()
        torch.testing.assert_close(pfc.center_grad.rows(), w_ref.grad, atol=1e-10, rtol=1e-8)
        opt.step()
        moved = (pfc.weight.detach() != before).any(dim=1)
        sampled = torch.zeros(60 * K, dtype=torch.bool)
        sampled[rows] = True
        assert not bool(moved[~sampled].any())
        assert bool(moved[sampled].all())  # weight decay moves every sampled row, argmax or not


def test_one_subcenter_is_todays_head_bit_for_bit():
    outs = []
    for kw in ({}, {"num_subcenters": 1}):
        torch.manual_seed(3)
        pfc = PartialFC(D, 50, 0.3, "arcface", comm=Communicator(), **kw)
        opt = SparseSGD(pfc, lr=0.1)
        run = []
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(B, D, generator=g, requires_grad=True), torch.randint(0, 50, (B,), generator=g)
            loss = pfc(x, y)
            loss.backward()
            opt.step()
            run.append((loss.detach(), x.grad, pfc.sampled_index.clone()))
        outs.append((run, pfc.weight.detach().clone()))
        assert "num_subcenters" not in repr(pfc)
    (run_a, w_a), (run_b, w_b) = outs
    assert torch.equal(w_a, w_b)
    for a, b in zip(run_a, run_b):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_bad_num_subcenters():
    with pytest.raises(ValueError, match="num_subcenters must be a positive integer, got 0"):
        PartialFC(D, C, 1.0, "arcface", comm=Communicator(), num_subcenters=0)


# ---- checkpoints ----

def test_checkpoint_and_reshard_keep_the_subcenters(tmp_path):
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=2, num_subcenters=K)
    trainer, _ = _train(cfg)
    assert trainer.pfc.weight.shape == (16 * K, 32)
    folder = checkpoint.step_dir(cfg.output, 2)
    shard = checkpoint.load(os.path.join(folder, "rank_0.pt"))
    assert shard["num_subcenters"] == K and shard["weight"].shape == (16 * K, 32)
    assert checkpoint.load(os.path.join(folder, "trainer.pt"))["num_subcenters"] == K
    assert reshard_main(["merge", folder, str(tmp_path / "merged.pt")]) == 0
    merged = reshard.load_merged(str(tmp_path / "merged.pt"))
    assert merged["num_subcenters"] == K and merged["num_classes"] == 16
    assert reshard_main(["split", str(tmp_path / "merged.pt"), "--world-size", "3", str(tmp_path / "three")]) == 0
    three = checkpoint.step_dir(str(tmp_path / "three"), 2)
    momentum = shard["pfc_optimizer"]["state"][0]["momentum_buffer"]
    for rank, (start, num) in enumerate([(0, 6), (6, 5), (11, 5)]):
        part = checkpoint.load(os.path.join(three, f"rank_{rank}.pt"))
        # Split by identity: all K rows of an identity stay on one rank.
        assert (part["class_start"], part["num_local"], part["num_subcenters"]) == (start, num, K)
        assert torch.equal(part["weight"], shard["weight"][start * K:(start + num) * K])
        assert torch.equal(part["pfc_optimizer"]["state"][0]["momentum_buffer"],
                           momentum[start * K:(start + num) * K])
    again = reshard.merge(three)
    assert again["num_subcenters"] == K and torch.equal(again["weight"], shard["weight"])
    # Resume of the 3-rank checkpoint on 1 rank re-merges the identities' rows.
    resumed, _ = _train(Config(cfg, output=str(tmp_path / "three"), resume=True, max_steps=3))
    assert resumed.step == 3


def test_resume_with_another_num_subcenters_is_refused_with_both_values(tmp_path):
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=2, num_subcenters=K)
    _train(cfg)
    with pytest.raises(RuntimeError, match=r"num_subcenters is 3 in the checkpoint and 2 in this run"):
        _train(Config(cfg, resume=True, max_steps=4, num_subcenters=2))
    plain = _tiny_config(tmp_path / "b", save_every=2, max_steps=2)
    _train(plain)
    with pytest.raises(RuntimeError, match=r"num_subcenters is 1 in the checkpoint and 3 in this run"):
        _train(Config(plain, resume=True, max_steps=4, num_subcenters=K))


def test_shards_with_mixed_subcenters_are_named(tmp_path):
    for rank, (start, num, k) in enumerate([(0, 2, 3), (2, 2, 1)]):
        torch.save(dict(weight=torch.zeros(num * k, 4), class_start=start, num_local=num, num_subcenters=k),
                   tmp_path / f"rank_{rank}.pt")
    with pytest.raises(reshard.ReshardError, match=r"rank_1.pt .*: 1 sub-centers per identity, but .*rank_0.pt "
                                                   r"has 3"):
        reshard.read_shards([str(tmp_path / "rank_0.pt"), str(tmp_path / "rank_1.pt")])
    torch.save(dict(weight=torch.zeros(5, 4), class_start=0, num_local=2, num_subcenters=3), tmp_path / "bad.pt")
    with pytest.raises(reshard.ReshardError, match=r"bad.pt: weight holds 5 rows, but num_local 2 x "
                                                   r"num_subcenters 3 is 6"):
        reshard.read_shards([str(tmp_path / "bad.pt")])
