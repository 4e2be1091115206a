"""Run under a launcher (torchrun, horovodrun) or alone: a few PartialFC steps at sample_rate=1 for each case
of ``CASES``: AdaFace and CurricularFace with one center per identity, and sub-center ArcFace (K = 3 rows per
identity, the identity's cosine the max over them) with ArcFace, a combined margin, ArcFace with interclass
filtering, AdaFace and CurricularFace.

    python margin_ranks_worker.py BACKEND OUT_DIR

Every rank builds the same global batches and class centers from fixed seeds, keeps its own rows and its
shard of the centers (all K rows of each of its identities), and runs STEPS forward/backward steps (moving its
centers by their gradient between steps, so the cosines, and which sub-center is nearest, change). Each rank
writes ``OUT_DIR/rank<r>.json``: per case and step the loss, the gradient of its embedding rows and of its
center rows, the head's running state, and their distance to a dense float64 model of the whole batch and all
``NUM_CLASSES * K`` centers, differentiated by autograd: for K = 1 the references of
tests/ops/test_margin_variants.py, for K = 3 the ones below.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "ops"))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from partialfc import PartialFC  # noqa: E402
from partialfc.comm import get_comm  # noqa: E402
from test_margin_variants import dense_adaface_loss, dense_curricular_loss  # noqa: E402

NUM_CLASSES, GLOBAL_BATCH, DIM, STEPS, LR = 37, 16, 10, 3, 0.5
ARCFACE, COMBINED = (64.0, 1.0, 0.5, 0.0), (32.0, 0.9, 0.4, 0.15)
START = {"adaface": {"adaface_batch_mean": 3.0, "adaface_batch_std": 0.6}, "curricularface": {"curricular_t": 0.3}}
STATE_KEYS = {"adaface": ("mean", "std"), "curricularface": ("t",)}
# name -> (margin, sub-centers per identity, interclass filtering threshold)
CASES = {
    "adaface": ("adaface", 1, 0.0),
    "curricularface": ("curricularface", 1, 0.0),
    "subcenter_arcface": (ARCFACE, 3, 0.0),
    "subcenter_combined": (COMBINED, 3, 0.0),
    "subcenter_arcface_filtered": (ARCFACE, 3, 0.2),
    "subcenter_adaface": ("adaface", 3, 0.0),
    "subcenter_curricularface": ("curricularface", 3, 0.0),
}


# ---- dense float64 models with K sub-centers (identity c owns rows c*K .. c*K+K-1 of w [C*K, D]) ----

def identity_cosines(x, w, k):
    """[B, C]: each identity's largest cosine over its k rows; autograd sends the gradient to that row."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()  # [B, C*k]
    return cos.view(x.shape[0], -1, k).amax(dim=2)


def dense_fixed_margin(cos, y, margin, filter_threshold):
    """``s*(cos(m1*theta + m2) - m3)`` on the target (``s*(t - m3 - m2*sin m2)`` past pi), ``s*cos`` elsewhere;
    a non-target cosine above ``filter_threshold`` (> 0) is a logit of 0 with no gradient."""
    s, m1, m2, m3 = margin
    target = cos[torch.arange(y.shape[0]), y].clamp(-1, 1)
    angle = m1 * torch.acos(target) + m2
    target_logit = torch.where(angle <= math.pi, torch.cos(angle) - m3, target - m3 - m2 * math.sin(m2))
    onehot = F.one_hot(y, cos.shape[1]).bool()
    others = cos.clamp(-1, 1)
    if filter_threshold > 0:
        others = torch.where((cos > filter_threshold) & ~onehot, torch.zeros_like(cos), others)
    return F.cross_entropy(s * torch.where(onehot, target_logit[:, None], others), y)


def dense_adaface_on(cos, norms, y, state, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    """AdaFace on given identity cosines; ``state`` {"mean", "std"} moves first, from the clipped norms."""
    norms = norms.detach().clip(0.001, 100)
    with torch.no_grad():
        state["mean"] = t_alpha * norms.mean() + (1 - t_alpha) * state["mean"]
        state["std"] = t_alpha * norms.std() + (1 - t_alpha) * state["std"]
    ms = ((norms - state["mean"]) / (state["std"] + eps) * h).clip(-1, 1)
    onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
    theta = (cos.clamp(-1 + eps, 1 - eps).acos() - onehot * (m * ms)[:, None]).clip(eps, math.pi - eps)
    return F.cross_entropy(s * (theta.cos() - onehot * (m + m * ms)[:, None]), y)


def dense_curricular_on(cos, y, state, m=0.5, s=64.0, t_alpha=0.01):
    """CurricularFace on given identity cosines; ``state`` {"t"} moves first, from the target cosines."""
    cos = cos.clamp(-1, 1)
    target = cos.gather(1, y[:, None])  # [B, 1]
    shifted = target * math.cos(m) - (1 - target ** 2).sqrt() * math.sin(m)  # cos(theta + m)
    with torch.no_grad():
        state["t"] = t_alpha * target.mean() + (1 - t_alpha) * state["t"]
    target_logit = torch.where(target > math.cos(math.pi - m), shifted, target - m * math.sin(math.pi - m))
    hard = (cos > shifted).detach()
    logits = torch.where(hard, cos * (state["t"] + cos), cos).scatter(1, y[:, None], target_logit)
    return F.cross_entropy(s * logits, y)


def dense_loss(margin, k, filter_threshold, x, w, y, state):
    if k == 1 and margin in ("adaface", "curricularface"):
        return (dense_adaface_loss if margin == "adaface" else dense_curricular_loss)(x, w, y, state)
    cos = identity_cosines(x, w, k)
    if margin == "adaface":
        return dense_adaface_on(cos, x.norm(dim=1), y, state)
    if margin == "curricularface":
        return dense_curricular_on(cos, y, state)
    return dense_fixed_margin(cos, y, margin, filter_threshold)


def global_step_batch(step, weight, k):
    """Labels, and embeddings near one of the target identity's sub-centers (which one varies), near the
    opposite of one (the margins' fallbacks), or anywhere, with norms around AdaFace's running mean."""
    gen = torch.Generator().manual_seed(77 + step)
    labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=gen)
    x = torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64)
    rows = labels * k + torch.randint(0, k, (GLOBAL_BATCH,), generator=gen)
    near = F.normalize(weight[rows], dim=1)
    x[:5] = near[:5] + 0.05 * x[:5]  # small angles: AdaFace's clip
    if k > 1:
        x[5:7] = -near[5:7] + 0.05 * x[5:7]
    x = F.normalize(x, dim=1) * (0.5 + 5 * torch.rand(GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64))
    return x, labels


def run_case(comm, name):
    margin, k, filter_threshold = CASES[name]
    rank, size = comm.rank, comm.size
    b = GLOBAL_BATCH // size
    weight = torch.randn(NUM_CLASSES * k, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pfc = PartialFC(DIM, NUM_CLASSES, 1.0, margin, comm=comm, interclass_filtering_threshold=filter_threshold,
                    num_subcenters=k).double()
    lo, n = pfc.class_start, pfc.num_local
    rows = slice(lo * k, (lo + n) * k)  # this rank's identities, all K rows of each
    pfc.weight.data = weight[rows].clone()
    start = START.get(margin, {}) if isinstance(margin, str) else {}
    pfc.load_head_state({key: torch.tensor(v, dtype=torch.float64) for key, v in start.items()})
    state = {key: torch.tensor(v, dtype=torch.float64) for key, v in zip(STATE_KEYS.get(margin, ()), start.values())}
    steps = []
    for step in range(STEPS):
        x, labels = global_step_batch(step, weight, k)
        x_local = x[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = pfc(x_local, labels[rank * b:(rank + 1) * b])
        loss.backward()
        center_grad = torch.zeros(n * k, DIM, dtype=torch.float64)
        center_grad[pfc.sampled_index] = pfc.center_grad.rows()

        x_ref, w_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = dense_loss(margin, k, filter_threshold, x_ref, w_ref, labels, state)
        ref.backward()
        head = {key: float(v) for key, v in pfc.head_state().items()}
        # Which sub-center is the nearest of each sample's own identity (the argmax the target's gradient takes).
        with torch.no_grad():
            cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()  # [B, C*K]
            nearest = cos.view(GLOBAL_BATCH, NUM_CLASSES, k)[torch.arange(GLOBAL_BATCH), labels].argmax(dim=1)
        steps.append({
            "loss": loss.item(), "x_grad": x_local.grad.tolist(), "w_grad": center_grad.tolist(), "head": head,
            "loss_err": abs(loss.item() - ref.item()),
            "x_grad_err": (x_local.grad - x_ref.grad[rank * b:(rank + 1) * b]).abs().max().item(),
            "w_grad_err": (center_grad - w_ref.grad[rows]).abs().max().item() if n else 0.0,
            "state_err": max([abs(head[key] - float(state[s])) for key, s in zip(start, state)], default=0.0),
            "target_subcenters": sorted(set(nearest.tolist())),
        })
        with torch.no_grad():
            pfc.weight -= LR * center_grad
            weight -= LR * w_ref.grad
    return {"num_local": n, "rows": n * k, "steps": steps}


def main():
    backend, out_dir = sys.argv[1], sys.argv[2]
    comm = get_comm(backend, "cpu")
    results = {"rank": comm.rank, "size": comm.size, "backend": comm.backend}
    for name in CASES:
        results[name] = run_case(comm, name)
    with open(os.path.join(out_dir, f"rank{comm.rank}.json"), "w") as f:
        json.dump(results, f)
    comm.shutdown()


if __name__ == "__main__":
    main()
