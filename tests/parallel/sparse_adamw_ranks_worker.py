"""Run alone (one process) or under torchrun: several PartialFC + SparseAdamW steps on this rank's shard.

    python sparse_adamw_ranks_worker.py BACKEND OUT_DIR

Every rank builds the same global batches from a fixed seed (the global batch size is the same for every
world size), keeps its own rows, and steps its shard of one full class-center table with SparseAdamW.

- "full" (sample_rate=1): the loss of every step and the shard, both moments and the step counts after the
  last step are compared with torch.optim.AdamW over the dense table driven by the dense single-process
  margin softmax (float64); the shard itself is written too, so the test can compare world sizes.
- "sampled" (sample_rate=0.4): rows never sampled on this rank keep weight and moments bit for bit, and
  each row's step count is the number of steps that sampled it.

Each rank writes ``OUT_DIR/rank<r>.json``.
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from _dense import dense_margin_loss  # noqa: E402
from partialfc.comm import get_comm  # noqa: E402
from partialfc.head import PartialFC, SparseAdamW  # noqa: E402

MARGIN = (64.0, 1.0, 0.5, 0.0)
NUM_CLASSES, GLOBAL_BATCH, DIM, STEPS = 37, 12, 10, 4
HYPER = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def global_batches():
    gen = torch.Generator().manual_seed(4321)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    steps = [(torch.randn(GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64),
              torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=gen)) for _ in range(STEPS)]
    return weight, steps


def head(comm, weight, sample_rate):
    pfc = PartialFC(DIM, NUM_CLASSES, sample_rate, MARGIN, comm=comm).double()
    pfc.weight.data = weight[pfc.class_start:pfc.class_start + pfc.num_local].clone()
    return pfc, SparseAdamW(pfc, **HYPER)


def full_case(comm):
    rank, size = comm.rank, comm.size
    b = GLOBAL_BATCH // size
    weight, steps = global_batches()
    pfc, opt = head(comm, weight, 1.0)
    lo, n = pfc.class_start, pfc.num_local
    dense = weight.clone().requires_grad_()
    dense_opt = torch.optim.AdamW([dense], foreach=False, **HYPER)
    loss_err = 0.0
    for x, labels in steps:
        loss = pfc(x[rank * b:(rank + 1) * b].clone().requires_grad_(), labels[rank * b:(rank + 1) * b])
        loss.backward()
        opt.step()
        opt.zero_grad()
        dense_opt.zero_grad()
        ref = dense_margin_loss(x, dense, labels, *MARGIN)
        ref.backward()
        dense_opt.step()
        loss_err = max(loss_err, abs(loss.item() - ref.item()))
    state, ref_state = opt.state[pfc.weight], dense_opt.state[dense]

    def err(got, want):
        return (got - want[lo:lo + n]).abs().max().item() if n else 0.0

    return {"class_start": lo, "num_local": n, "loss_err": loss_err,
            "weight_err": err(pfc.weight.detach(), dense.detach()),
            "exp_avg_err": err(state["exp_avg"], ref_state["exp_avg"]),
            "exp_avg_sq_err": err(state["exp_avg_sq"], ref_state["exp_avg_sq"]),
            "row_step": state["row_step"].tolist(), "weight": pfc.weight.detach().tolist(),
            "moved": err(pfc.weight.detach(), weight)}


def sampled_case(comm):
    rank, size = comm.rank, comm.size
    b = GLOBAL_BATCH // size
    weight, steps = global_batches()
    pfc, opt = head(comm, weight, 0.4)
    state = opt.materialize_state()
    counts = torch.zeros(pfc.num_local, dtype=torch.int64)
    start = pfc.weight.detach().clone()
    for x, labels in steps:
        pfc(x[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b]).backward()
        opt.step()
        opt.zero_grad()
        counts[pfc.sampled_index] += 1
    never = counts == 0
    return {"num_sample": pfc.num_sample, "never_sampled": int(never.sum()),
            "row_step_matches": bool(torch.equal(state["row_step"], counts)),
            "unsampled_kept": bool(torch.equal(pfc.weight.detach()[never], start[never])
                                   and not state["exp_avg"][never].any() and not state["exp_avg_sq"][never].any()),
            "sampled_moved": bool((pfc.weight.detach()[~never] != start[~never]).any(dim=1).all())}


def main():
    backend, out_dir = sys.argv[1], sys.argv[2]
    comm = get_comm(backend, "cpu")
    results = {"rank": comm.rank, "size": comm.size, "backend": comm.backend,
               "full": full_case(comm), "sampled": sampled_case(comm)}
    with open(os.path.join(out_dir, f"rank{comm.rank}.json"), "w") as f:
        json.dump(results, f)
    comm.shutdown()


if __name__ == "__main__":
    main()
