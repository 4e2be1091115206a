"""Helpers shared by the compiled-op tests (tolerances, layouts, the CUDA skip reason)."""
import torch

from partialfc.ops import extension

# Absolute / relative tolerances per storage dtype when a kernel is compared with its reference.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-3, 2e-3)}


def noncontiguous_like(t):
    """The same values as ``t`` in a tensor with non-unit inner stride (a column slice of a wider tensor)."""
    wide = torch.empty(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype, device=t.device)
    view = wide[:, 1::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() == 0
    return view


def no_gpu_reason():
    """Why the CUDA kernels cannot run here (a skip reason), or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device in this torch/machine"
    if extension.available() and not extension.with_cuda():
        return "partialfc._C was built without CUDA kernels"
    return None


def random_cosines(batch, cols, dtype, device, layout="rows", seed=0, spread=1.8):
    """``(cosines [B, S], labels [B])``: cosines uniform in ``[-spread / 2, spread / 2]`` (beyond +-1 when
    spread > 2), labels in ``[-1, S)``; ``layout`` "rows", "class_major" (the CPU step's) or "strided"."""
    g = torch.Generator().manual_seed(seed)
    cosines = ((torch.rand(batch, cols, generator=g) - 0.5) * spread).to(dtype).to(device)
    labels = torch.randint(-1, cols, (batch,), generator=g).to(device)
    if layout == "class_major":
        cosines = cosines.t().contiguous().t()
    elif layout == "strided":
        cosines = noncontiguous_like(cosines)
    return cosines, labels
