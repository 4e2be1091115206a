"""CPU-only speed mechanisms of the compiled table. Nothing on a GPU constructs them.

The head's step is the same code on every table (``partialfc.head.partial_fc``); on CPU the compiled table
changes only where the step's memory comes from and how the logits are laid out:

- ``reuse_buffers``: the step's large scratch tensors (sampled centers, logits, the centers' gradient) are
  kept from step to step. A fresh multi-hundred-MB tensor costs page faults on every page each step, more
  than the gather that fills it. The price: a backward must follow its own forward.
- ``huge_pages``: the table, its optimizer state and those buffers ask Linux for transparent huge pages
  (``madvise(MADV_HUGEPAGE)``): the S sampled rows of a multi-GB table are scattered, one 4 KiB page each,
  and huge pages cut the TLB misses of gathering and updating them.
- ``class_major``: the logits are held class by class ([S, B] row-major, handed to the ops as the [B, S]
  transpose). MKL runs the forward GEMM into that layout (centers @ features^T) faster than into [B, S];
  the margin-softmax CPU kernels read either layout.

Each is a constructor flag, so ``benchmarks/head_step.py`` measures the step without it in the same run;
``docs/benchmarks.md`` has what each buys.
"""
import ctypes
import math
import sys

import torch

from .tables import CompiledOps

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_libc = None


def advise_huge_pages(tensor):
    """Ask Linux to back the 2 MiB-aligned part of a CPU tensor's memory with transparent huge pages;
    returns whether the kernel accepted. Pages already touched stay small (until khugepaged merges them),
    so call it on a fresh ``torch.empty`` before filling it. False elsewhere, for tensors under 4 MiB, and
    when THP is disabled."""
    global _libc
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < 2 * _HUGE_PAGE:
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            _libc.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    start = tensor.data_ptr()
    begin = (start + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    end = (start + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return end > begin and _libc.madvise(begin, end - begin, _MADV_HUGEPAGE) == 0


def empty_huge(shape, dtype=torch.float32):
    """``torch.empty(shape)`` on CPU, backed by transparent huge pages where the OS allows."""
    out = torch.empty(shape, dtype=dtype)
    advise_huge_pages(out)
    return out


class CpuCompiledOps(CompiledOps):
    """The compiled table on CPU, with the mechanisms of this module (all on by default)."""

    def __init__(self, device="cpu", reuse_buffers=True, huge_pages=True, class_major=True):
        super().__init__(device)
        self.reuses_buffers, self.huge_pages, self.class_major = reuse_buffers, huge_pages, class_major
        self.buffers = {}  # name -> flat tensor, grown when a step needs more

    def empty_table(self, shape, dtype):
        return empty_huge(shape, dtype) if self.huge_pages else torch.empty(shape, dtype=dtype)

    def empty(self, name, shape, dtype):
        if not self.reuses_buffers:
            return self.empty_table(shape, dtype)
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self.buffers[name] = None  # free the old one first
            buf = self.buffers[name] = self.empty_table((numel,), dtype)
        return buf[:numel].view(shape)

    def empty_logits(self, name, batch, num_sample, dtype):
        if self.class_major:
            return self.empty(name, (num_sample, batch), dtype).t()
        return self.empty(name, (batch, num_sample), dtype)
