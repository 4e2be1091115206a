"""Run under a launcher (torchrun, horovodrun) or alone: a few PartialFC steps with AdaFace and with
CurricularFace at sample_rate=1.

    python margin_ranks_worker.py BACKEND OUT_DIR

Every rank builds the same global batches and class centers from fixed seeds, keeps its own rows and its
shard of the centers, and runs STEPS forward/backward steps (moving its centers by their gradient between
steps, so the cosines change). Each rank writes ``OUT_DIR/rank<r>.json``: per margin and step the loss, the
gradient of its embedding rows and of its centers, the head's running state, and their distance to the
dense float64 references of tests/ops/test_margin_variants.py over the whole batch.
"""
import json
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
START = {"adaface": {"adaface_batch_mean": 3.0, "adaface_batch_std": 0.6}, "curricularface": {"curricular_t": 0.3}}
DENSE = {"adaface": (dense_adaface_loss, ("mean", "std")), "curricularface": (dense_curricular_loss, ("t",))}


def global_step_batch(step, weight):
    gen = torch.Generator().manual_seed(77 + step)
    labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=gen)
    x = torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64)
    x[:3] = F.normalize(weight[labels[:3]], dim=1) + 0.05 * x[:3]  # small angles: AdaFace's clip
    x = F.normalize(x, dim=1) * (0.5 + 5 * torch.rand(GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64))
    return x, labels


def run_margin(comm, margin):
    rank, size = comm.rank, comm.size
    b = GLOBAL_BATCH // size
    weight = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pfc = PartialFC(DIM, NUM_CLASSES, 1.0, margin, comm=comm).double()
    lo, n = pfc.class_start, pfc.num_local
    pfc.weight.data = weight[lo:lo + n].clone()
    pfc.load_head_state({k: torch.tensor(v, dtype=torch.float64) for k, v in START[margin].items()})
    dense, keys = DENSE[margin]
    state = {k: torch.tensor(v, dtype=torch.float64) for k, v in zip(keys, START[margin].values())}
    steps = []
    for step in range(STEPS):
        x, labels = global_step_batch(step, weight)
        x_local = x[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = pfc(x_local, labels[rank * b:(rank + 1) * b])
        loss.backward()
        center_grad = torch.zeros(n, DIM, dtype=torch.float64)
        center_grad[pfc.sampled_index] = pfc.center_grad.rows()

        x_ref, w_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = dense(x_ref, w_ref, labels, state)
        ref.backward()
        head = {k: float(v) for k, v in pfc.head_state().items()}
        steps.append({
            "loss": loss.item(), "x_grad": x_local.grad.tolist(), "w_grad": center_grad.tolist(), "head": head,
            "loss_err": abs(loss.item() - ref.item()),
            "x_grad_err": (x_local.grad - x_ref.grad[rank * b:(rank + 1) * b]).abs().max().item(),
            "w_grad_err": (center_grad - w_ref.grad[lo:lo + n]).abs().max().item() if n else 0.0,
            "state_err": max(abs(head[key] - float(state[k])) for key, k in zip(START[margin], keys)),
        })
        with torch.no_grad():
            pfc.weight -= LR * center_grad
            weight -= LR * w_ref.grad
    return {"num_local": n, "steps": steps}


def main():
    backend, out_dir = sys.argv[1], sys.argv[2]
    comm = get_comm(backend, "cpu")
    results = {"rank": comm.rank, "size": comm.size, "backend": comm.backend}
    for margin in ("adaface", "curricularface"):
        results[margin] = run_margin(comm, margin)
    with open(os.path.join(out_dir, f"rank{comm.rank}.json"), "w") as f:
        json.dump(results, f)
    comm.shutdown()


if __name__ == "__main__":
    main()
