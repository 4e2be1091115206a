"""The read-only margin forward (``store_logits=False``) and the backward that derives the logits from the
cosines (``from_cosines=True``): bit for bit the pair that stores the logits, on every table, and the head
on a table that uses them (as the CUDA table does) trains exactly as on one that does not."""
import pytest
import torch

from partialfc import ops
from partialfc.head import PartialFC, SparseSGD
from partialfc.ops.cpu import CpuCompiledOps

from ops_testutil import random_cosines

ARCFACE = (64.0, 1.0, 0.5, 0.0)


def _margin_kwargs(kind, batch, device):
    if kind == "fixed":
        return None
    hard = torch.linspace(-0.2, 0.6, batch, device=device) if kind == "curricular" else None
    sample_m2 = torch.linspace(0.0, 0.2, batch, device=device) if kind == "adaface" else None
    return dict(sample_m2=sample_m2, sample_m3=None, clip_eps=1e-3 if kind == "adaface" else 0.0,
                hard_threshold=hard, hard_t=0.3 if kind == "curricular" else 0.0)


def _forward(table, logits, labels, kw, threshold, store):
    if kw is None:
        return table.margin_softmax_forward(logits, labels, *ARCFACE, threshold, store_logits=store)
    return table.margin_softmax_forward_adaptive(logits, labels, *ARCFACE, threshold, **kw, store_logits=store)


def _backward(table, logits, labels, stats, kw, threshold, absmax, from_cosines):
    args = (logits, labels, stats[0], stats[1], stats[3], *ARCFACE, 0.5, threshold)
    if kw is None:
        table.margin_softmax_backward(*args, absmax, from_cosines)
    else:
        table.margin_softmax_backward_adaptive(*args, **kw, grad_absmax=absmax, from_cosines=from_cosines)
    return logits


@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "class_major", "strided"])
@pytest.mark.parametrize("kind", ["fixed", "adaface", "curricular"])
@pytest.mark.parametrize("threshold", [0.0, 0.4])
@pytest.mark.parametrize("cols", [300, 9000], ids=["short", "long"])  # one block per row / split rows on CUDA
def test_reading_the_cosines_gives_the_storing_pair_bit_for_bit(device, impl, dtype, layout, kind, threshold, cols):
    table = ops.op_table(device, use_ext=impl == "compiled")
    cosines, labels = random_cosines(5, cols, dtype, device, layout, spread=2.2)
    kw = _margin_kwargs(kind, 5, device)
    stored = cosines.clone()
    stats = _forward(table, stored, labels, kw, threshold, store=True)
    read = cosines.clone()
    read_stats = _forward(table, read, labels, kw, threshold, store=False)
    assert torch.equal(read, cosines)  # only read
    for a, b in zip(stats, read_stats):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
    absmax, read_absmax = torch.zeros(1, device=device), torch.zeros(1, device=device)
    grad = _backward(table, stored, labels, stats, kw, threshold, absmax, False)
    read_grad = _backward(table, read, labels, read_stats, kw, threshold, read_absmax, True)
    assert torch.equal(grad, read_grad)
    assert torch.equal(absmax, read_absmax)


class CosineReadingCpuOps(CpuCompiledOps):
    """The CPU table with the CUDA table's choice: a read-only forward, the backward from the cosines."""

    margin_reads_cosines = True


@pytest.mark.parametrize("margin", [ARCFACE, "adaface", "curricularface"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_head_on_a_cosine_reading_table_trains_bit_for_bit_as_on_the_storing_one(margin, dtype):
    def run(reads):
        pfc = PartialFC(16, 60, sample_rate=0.5, margin=margin, interclass_filtering_threshold=0.3)
        if reads:
            pfc.ops = pfc.compute_ops = CosineReadingCpuOps()
        assert pfc.compute_ops.margin_reads_cosines is reads
        opt = SparseSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(3)
        out = []
        for _ in range(3):
            x = torch.randn(8, 16, generator=g).requires_grad_()
            y = torch.randint(0, 60, (8,), generator=g)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = pfc(x, y)
            loss.backward()
            out += [loss.detach(), x.grad, pfc.center_grad.normalized_grad.clone()]
            opt.step()
            opt.zero_grad()
        return out + [pfc.weight.detach().clone()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_the_cuda_table_reads_the_cosines_and_the_others_store_them():
    assert ops.tables.CompiledOps("cuda").margin_reads_cosines
    assert not ops.tables.CompiledOps("cpu").margin_reads_cosines
    assert not ops.op_table("cpu", use_ext=True).margin_reads_cosines
    assert not ops.op_table("cpu", use_ext=False).margin_reads_cosines
    assert not ops.tables.ReferenceOps("cuda").margin_reads_cosines
