"""Run alone (one process) or under torchrun / horovodrun: PartialFC + SparseSGD steps at sample_rate=1 on this
rank's shard of one global class-center table, stored in float32, bfloat16 and float16.

    python center_dtype_ranks_worker.py BACKEND OUT_DIR

Every rank builds the same global table and batches from fixed seeds (the global batch is the same for every
world size), takes its rows of the table and its samples of each batch, and steps its shard. Per case it
writes the bit patterns of its shard and its momentum after the last step, and of each step's gradient
(``normalized_grad``, ``inv_norm``), so the test can compare world sizes bit for bit and replay the updates on
the whole table. Each rank writes ``OUT_DIR/rank<r>.json``.
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from partialfc.comm import get_comm  # noqa: E402
from partialfc.head import PartialFC, SparseSGD  # noqa: E402

MARGIN = (64.0, 1.0, 0.5, 0.0)
NUM_CLASSES, GLOBAL_BATCH, DIM, STEPS = 37, 12, 16, 5
HYPER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
# name -> (center_dtype, num_subcenters)
CASES = {"float32": ("float32", 1), "bfloat16": ("bfloat16", 1), "float16": ("float16", 1),
         "bfloat16_k2": ("bfloat16", 2)}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(tensor):
    """The bit patterns of a tensor, flattened to a list of ints."""
    return tensor.detach().contiguous().view(BITS[tensor.dtype]).flatten().tolist()


def global_inputs(k):
    gen = torch.Generator().manual_seed(4321)
    table = torch.randn(NUM_CLASSES * k, DIM, generator=gen) * 0.1  # float32 [C*K, D]
    steps = [(torch.randn(GLOBAL_BATCH, DIM, generator=gen), torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,),
                                                                          generator=gen)) for _ in range(STEPS)]
    return table, steps


def run_case(comm, center_dtype, k):
    rank, size = comm.rank, comm.size
    b = GLOBAL_BATCH // size
    table, steps = global_inputs(k)
    pfc = PartialFC(DIM, NUM_CLASSES, 1.0, MARGIN, comm=comm, center_dtype=center_dtype, num_subcenters=k)
    rows = slice(pfc.class_start * k, (pfc.class_start + pfc.num_local) * k)
    with torch.no_grad():
        pfc.weight.copy_(table[rows])  # to nearest: the same start on every world size
    opt = SparseSGD(pfc, **HYPER)
    losses, grads = [], []
    for x, labels in steps:
        loss = pfc(x[rank * b:(rank + 1) * b].clone().requires_grad_(), labels[rank * b:(rank + 1) * b])
        loss.backward()
        grad = pfc.center_grad
        grads.append(dict(index=grad.index.tolist(), normalized_grad=bits(grad.normalized_grad),
                          inv_norm=bits(grad.inv_norm)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(class_start=pfc.class_start, num_local=pfc.num_local, dtype=str(pfc.weight.dtype),
                weight=bits(pfc.weight), momentum=bits(opt.momentum_buffer()), grads=grads, losses=losses,
                rounding_step=int(opt.state[pfc.weight]["rounding_step"]), seed=pfc.seed)


def main():
    backend, out_dir = sys.argv[1], sys.argv[2]
    comm = get_comm(backend, "cpu")
    results = {"rank": comm.rank, "size": comm.size, "backend": comm.backend,
               "cases": {name: run_case(comm, *case) for name, case in CASES.items()}}
    with open(os.path.join(out_dir, f"rank{comm.rank}.json"), "w") as f:
        json.dump(results, f)
    comm.shutdown()


if __name__ == "__main__":
    main()
