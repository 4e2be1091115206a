"""Run under a launcher (horovodrun, mpirun, torchrun): checks one distributed PartialFC step.

    python equivalence_worker.py BACKEND OUT_DIR CASE [CASE ...]

Every rank builds the same global batch from a fixed seed, keeps its own rows, and runs the head over its
shard of the same full class-center matrix. The loss, the embedding gradient of its rows and the
gradient of its centers are compared with the dense single-process margin softmax (float64); each rank
writes ``OUT_DIR/rank<r>.json`` with its errors per case, or the error message for the bad-input cases.
The bad-input cases raise on every rank at once, so the ranks stay in step for the next case.
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from _dense import dense_margin_loss  # noqa: E402
from partialfc import PartialFC  # noqa: E402
from partialfc.comm import get_comm  # noqa: E402

MARGIN = (64.0, 1.0, 0.5, 0.0)
CASES = {
    # name: (num_classes, local batch, embedding size, labels rule)
    "divisible": (48, 4, 10, "random"),
    "uneven": (37, 3, 10, "random"),
    "no_positive": (29, 4, 10, "first_rank_only"),
}


def global_batch(case, size):
    num_classes, b, dim, rule = CASES[case]
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(size * b, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    high = num_classes if rule == "random" else max(1, num_classes // (2 * size))
    labels = torch.randint(0, high, (size * b,), generator=gen)
    return x, weight, labels


def main():
    backend, out_dir, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
    comm = get_comm(backend, "cpu")
    rank, size = comm.rank, comm.size
    results = {"rank": rank, "size": size, "backend": comm.backend}
    for case in cases:
        result = results[case] = {}
        try:
            if case in CASES:
                result.update(check_equivalence(comm, case))
            elif case == "mismatched_batch":
                pfc = PartialFC(4, 10, comm=comm).double()
                b = 3 + (rank == size - 1)
                pfc(torch.randn(b, 4, dtype=torch.float64), torch.zeros(b, dtype=torch.long))
            elif case == "bad_label":
                pfc = PartialFC(4, 10, comm=comm).double()
                labels = torch.tensor([1, 2, 12 if rank == size - 1 else 3])
                pfc(torch.randn(3, 4, dtype=torch.float64), labels)
            else:
                raise SystemExit(f"unknown case {case}")
        except ValueError as exc:
            result["error"] = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    comm.shutdown()


def check_equivalence(comm, case):
    rank, size = comm.rank, comm.size
    x, weight, labels = global_batch(case, size)
    num_classes, b, dim, _ = CASES[case]
    pfc = PartialFC(dim, num_classes, 1.0, MARGIN, comm=comm).double()
    lo, n = pfc.class_start, pfc.num_local
    pfc.weight.data = weight[lo:lo + n].clone()
    x_local = x[rank * b:(rank + 1) * b].clone().requires_grad_()
    loss = pfc(x_local, labels[rank * b:(rank + 1) * b])
    loss.backward()

    x_ref = x.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    ref = dense_margin_loss(x_ref, w_ref, labels, *MARGIN)
    ref.backward()
    center_grad = torch.zeros(n, dim, dtype=torch.float64)
    center_grad[pfc.sampled_index] = pfc.center_grad.rows()
    return {
        "loss": loss.item(), "loss_ref": ref.item(),
        "loss_err": abs(loss.item() - ref.item()),
        "x_grad_err": (x_local.grad - x_ref.grad[rank * b:(rank + 1) * b]).abs().max().item(),
        "w_grad_err": (center_grad - w_ref.grad[lo:lo + n]).abs().max().item() if n else 0.0,
        "num_local": n, "local_positives": int(((labels >= lo) & (labels < lo + n)).sum()),
    }


if __name__ == "__main__":
    main()
