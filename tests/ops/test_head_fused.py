"""The PartialFC head and SparseSGD on the compiled kernels against the reference path and a dense softmax."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from partialfc import ops
from partialfc.head import PartialFC, SparseSGD

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCFACE = (64.0, 1.0, 0.5, 0.0)


def make_head(use_ext, num_classes=300, dim=32, rate=1.0, margin=ARCFACE, threshold=0.0, device="cpu"):
    pfc = PartialFC(dim, num_classes, sample_rate=rate, margin=margin, use_ext=use_ext,
                    interclass_filtering_threshold=threshold).to(device)
    if rate < 1.0:
        # Both paths sample the same classes: the reference sampler with identically seeded generators.
        gen = torch.Generator().manual_seed(11)
        pfc.sample = lambda labels: ops.sample_classes_ref(labels, pfc.class_start, pfc.num_local, pfc.num_sample,
                                                           gen)
    return pfc, SparseSGD(pfc, lr=0.2, momentum=0.9, weight_decay=5e-4)


def run_steps(use_ext, steps=3, batch=16, dtype=None, device="cpu", **kw):
    pfc, opt = make_head(use_ext, device=device, **kw)
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, pfc.embedding_size, generator=g).to(device).requires_grad_()
        y = torch.randint(0, pfc.num_classes, (batch,), generator=g).to(device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = pfc(x, y)
        loss.backward()
        out.append((loss.detach(), x.grad, pfc.sampled_index.clone(), pfc.center_grad.rows()))
        opt.step()
        opt.zero_grad()
    return out, pfc.weight.detach().clone(), opt.momentum_buffer().clone()


@pytest.mark.parametrize("rate", [1.0, 0.2])
@pytest.mark.parametrize("margin,threshold", [(ARCFACE, 0.0), ((64.0, 1.0, 0.0, 0.4), 0.0), (ARCFACE, 0.3)])
def test_fused_head_matches_reference_fp32(device, rate, margin, threshold):
    fused, w_fused, m_fused = run_steps(True, rate=rate, margin=margin, threshold=threshold, device=device)
    ref, w_ref, m_ref = run_steps(False, rate=rate, margin=margin, threshold=threshold, device=device)
    def close(a, b):  # within 1e-5 of the tensor's scale (float32 GEMMs sum in a different order)
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=1e-5)

    for (l1, gx1, i1, gw1), (l2, gx2, i2, gw2) in zip(fused, ref):
        assert torch.equal(i1, i2)
        close(l1, l2)
        close(gx1, gx2)
        close(gw1, gw2)
    close(w_fused, w_ref)
    close(m_fused, m_ref)


def test_fused_head_matches_reference_bf16_autocast(device):
    fused, w_fused, _ = run_steps(True, steps=2, dtype=torch.bfloat16, rate=0.5, device=device)
    ref, w_ref, _ = run_steps(False, steps=2, dtype=torch.bfloat16, rate=0.5, device=device)
    for (l1, gx1, _, gw1), (l2, gx2, _, gw2) in zip(fused, ref):
        torch.testing.assert_close(l1, l2, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(gx1, gx2, atol=2e-2 * float(gx2.abs().max()), rtol=5e-2)
        torch.testing.assert_close(gw1, gw2, atol=2e-2 * float(gw2.abs().max()), rtol=5e-2)
    torch.testing.assert_close(w_fused, w_ref, atol=2e-2 * float(w_ref.abs().max()), rtol=5e-2)


def test_fused_head_matches_dense_softmax(device):
    """sample_rate=1: loss and gradients equal a plain dense ArcFace softmax written with autograd."""
    pfc, _ = make_head(True, num_classes=50, dim=8, device=device)
    pfc.double()  # float64 kernels end to end: the comparison is not blurred by float32 rounding
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randint(0, 50, (12,), generator=g).to(device)
    loss = pfc(x, y)
    loss.backward()

    w = pfc.weight.detach().clone().requires_grad_()
    xd = x.detach().clone().requires_grad_()
    cos = F.normalize(xd) @ F.normalize(w).t()
    s, m1, m2, m3 = ARCFACE
    theta = torch.acos(cos.clamp(-1, 1).gather(1, y[:, None]))
    target = torch.where(m1 * theta + m2 <= math.pi, torch.cos(m1 * theta + m2) - m3,
                         cos.gather(1, y[:, None]) - m3 - m2 * math.sin(m2))
    logits = cos.clamp(-1, 1).scatter(1, y[:, None], target) * s
    dense_loss = F.cross_entropy(logits, y)
    dense_loss.backward()
    assert pfc.center_grad.rows().dtype == torch.float64
    torch.testing.assert_close(loss, dense_loss, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x.grad, xd.grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(pfc.center_grad.rows(), w.grad[pfc.sampled_index], atol=1e-9, rtol=1e-9)


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        flat = result if isinstance(result, (tuple, list)) else [result]
        for t in flat:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.outputs.append((str(func), tuple(t.shape), storage.data_ptr(), storage.nbytes()))
        return result


@pytest.mark.parametrize("use_ext", [True, False])
def test_no_dense_gradient_at_large_num_local(use_ext):
    num_classes, dim, batch = 400_000, 16, 32
    pfc, opt = make_head(use_ext, num_classes=num_classes, dim=dim, rate=0.01)
    opt.momentum_buffer()  # the optimizer state is [num_local, D] by design; created before recording
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        x = torch.randn(batch, dim, generator=g).requires_grad_()
        y = torch.randint(0, num_classes, (batch,), generator=g)
        with _RecordShapes() as rec:
            pfc(x, y).backward()
            opt.step()
            opt.zero_grad()
    # Storages produced during the step, other than the table and its momentum (which views may expose).
    table = {pfc.weight.untyped_storage().data_ptr(), opt.momentum_buffer().untyped_storage().data_ptr()}
    produced = [(f, shape, ptr, nbytes) for f, shape, ptr, nbytes in rec.outputs if ptr not in table]
    big = [(f, shape) for f, shape, _, nbytes in produced if nbytes >= num_classes * dim * 4 // 10]
    assert not big, f"tensors of table size were produced: {big}"
    if use_ext:
        # Steady state of the fused path: every [S, D] / [B, S] storage is one of the reused workspace buffers.
        num_sample = pfc.num_sample
        owned = {buf.untyped_storage().data_ptr() for buf in pfc.ops.buffers.values()}
        large = [(f, shape, ptr) for f, shape, ptr, nbytes in produced if nbytes >= num_sample * dim * 4 // 2]
        assert large and all(ptr in owned for _, _, ptr in large), large


def test_stale_backward_is_an_error():
    pfc, _ = make_head(True)
    x = torch.randn(8, 32, requires_grad=True)
    y = torch.randint(0, 300, (8,))
    first = pfc(x, y)
    pfc(x, y)
    with pytest.raises(RuntimeError, match="reuses its buffers"):
        first.backward()


def test_disable_env_forces_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a compiled op ran although PARTIALFC_DISABLE_EXT=1")

    monkeypatch.setenv("PARTIALFC_DISABLE_EXT", "1")
    monkeypatch.setattr(torch.ops.partialfc, "gather_normalize_out", boom, raising=False)
    monkeypatch.setattr(ops.CompiledOps, "sample_classes", boom)
    pfc = PartialFC(32, 300, sample_rate=0.5, margin=ARCFACE, use_ext=True)
    opt = SparseSGD(pfc, lr=0.2, momentum=0.9, weight_decay=5e-4)
    assert isinstance(pfc.ops, ops.ReferenceOps)
    pfc(torch.randn(8, 32, requires_grad=True), torch.randint(0, 300, (8,))).backward()
    opt.step()


def test_missing_extension_warns_once_and_trains():
    """With partialfc._C unloadable, the package imports, warns once naming the cause, and trains."""
    code = r"""
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "partialfc._C":
            raise ImportError("simulated: libfoo.so: cannot open shared object file")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from partialfc import ops
    from partialfc.ops import extension as _ext
    from partialfc.head import PartialFC, SparseSGD
    import partialfc.head.partial_fc
pfc = PartialFC(8, 40, sample_rate=0.5)
opt = SparseSGD(pfc, lr=0.1)
pfc(torch.randn(4, 8, requires_grad=True), torch.tensor([1, 2, 3, 39])).backward()
opt.step()
ours = [w for w in caught if "partialfc._C" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert "simulated: libfoo.so" in str(ours[0].message), ours[0].message
assert not _ext.available() and isinstance(pfc.ops, ops.ReferenceOps)
print("OK")
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PARTIALFC_DISABLE_EXT", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
