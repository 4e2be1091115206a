"""Host-resident class centers: ``PartialFC(..., center_device="cpu")``.

The table and its optimizer state stay in host memory whatever device the head runs on; only the rows a
step samples travel. One step of a CUDA run (docs/kernels.md, "Host-resident centers"):

    main thread   labels -> allgather -> sample, with the head's own sampler (hold_sample) -> stage(rows) --+
    host thread   gather + normalize the rows on the host (CPU kernels) into a pinned buffer [S, D],        |
                  copy it to the device on a side stream, record an event                                   |
    GPU           backbone forward ........................................................................ |
    main thread   head forward: the compute stream waits on that event <------------------------------------+
                  head backward: dWs [S, D] = grad_logits^T @ features on the device, copied to a pinned host
                  buffer on the side stream while the backbone's backward runs
                  optimizer step: the CPU fused update of the sampled rows (weight, momentum / moments), on
                  the host, with the inverse norms that the gather left there

Why no stage reads a stale row: a stage is started on the calling thread, by ``hold_sample`` or the
forward of its own step, and the trainer calls those only after the previous step's optimizer step
returned; that update runs synchronously on the calling thread, so every row it writes is written before
the next gather is submitted. The host thread runs one stage at a time, in submission order. The sampling
and every collective stay on the calling thread, so the sampler's generator is drawn from exactly as in
device-resident mode: on CPU both modes give the same losses and tables bit for bit.

When the compute device is the host (CPU training, and the tests), the same code runs with no copies: the
gathered rows are the step's centers and the gradient is already where the update runs. Pinned memory
cannot be allocated without CUDA, and nothing needs it then, so nothing is pinned.
"""
import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .. import ops
from ..ops import accumulation_dtype
from .partial_fc import CenterGrad, all_finite

DEVICE_RESIDENT, HOST_RESIDENT = "", "cpu"


def resolve_center_device(value):
    """``""`` (the table on the training device) for None, ``""`` and ``"auto"``; ``"cpu"`` for host-resident
    centers; a ValueError naming ``center_device`` for anything else."""
    if value is None or value in ("", "auto"):
        return DEVICE_RESIDENT
    if value == "cpu":
        return HOST_RESIDENT
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"center_device must be '', 'auto' (the training device) or 'cpu' (host memory), got "
                         f"{value!r}") from None
    if device.type == "cpu":
        return HOST_RESIDENT
    raise ValueError(f"center_device={value!r}: host-resident centers live in host memory ('cpu'); to keep "
                     f"the table on the training device ({device.type}) leave center_device '' or 'auto'")


class HostCenters:
    """Stages each step's sampled rows of a host-resident table for the compute device.

    ``host_ops`` is the CPU op table (gather, normalize, update); ``device`` the compute device, set through
    the head's ``.to()``, and ``compute_ops`` its op table (the logits' ops). One worker thread runs the
    gathers and starts the copies, in the order the stages were asked for.
    """

    def __init__(self, host_ops, use_ext=True):
        self.host_ops, self.use_ext = host_ops, use_ext
        self.device = torch.device("cpu")
        self.compute_ops = ops.op_table(self.device, use_ext)
        # The dtype the rows are staged in: the compute dtype of the last forward (a bf16 autocast run stages
        # bf16 rows, half the bytes over the link); before the first forward the accumulation dtype.
        self.stage_dtype = None
        self.stages = self.prefetched = 0  # stages started, and those started before their step's forward
        self._executor = None
        self._stream = None  # the side CUDA stream of the copies
        self._pinned = {}  # name -> flat page-locked buffer, grown when a step needs more
        self._last_copy = None  # event: the last copy out of the pinned centers buffer

    def apply(self, module, fn, *args, **kwargs):
        """``module._apply(fn)`` (``.to()``, ``.cuda()``, ``.double()``) for a head whose table stays here: the
        buffers move with ``fn``, the table takes ``fn``'s dtype on the host, and the compute device becomes
        ``fn``'s device."""
        weight = module._parameters.pop("weight")
        try:
            nn.Module._apply(module, fn, *args, **kwargs)
        finally:
            module._parameters["weight"] = weight
        probe = fn(torch.empty(0, dtype=weight.dtype))  # where and in what dtype fn puts a table
        if probe.dtype != weight.dtype:
            weight.data = weight.data.to(probe.dtype)
        self.to(probe.device)

    def to(self, device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"center_device='cpu' stages the sampled rows for a CPU or CUDA training device, "
                             f"got {device}")
        if device != self.device:
            self.wait_idle()
            self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            self._pinned, self._last_copy = {}, None
            self.device = device
            self.compute_ops = ops.op_table(device, self.use_ext)

    def center_grad(self, weight, rows, identities, prefetch=False):
        """A ``HostCenterGrad`` for the table rows ``rows`` [S] (host), whose gather starts now on the host
        thread. ``prefetch``: the stage is started before its step's forward (``hold_sample``)."""
        stage = HostStage(self, rows, self.stage_dtype or accumulation_dtype(weight.dtype), prefetch)
        if self.device.type == "cpu":
            # The compute device is the host: the rows go straight into the step's buffers, which the compiled
            # CPU table reuses from step to step as the device-resident gather does. They are taken here, on
            # the calling thread, and from now on a backward of an earlier forward is refused (as after the
            # next forward in device-resident mode): it would read rows this stage overwrites.
            table, acc = self.compute_ops, accumulation_dtype(weight.dtype)
            table.generation += 1
            stage.buffers = (table.empty("centers", (rows.numel(), weight.shape[1]), stage.dtype),
                             table.empty("inv_norm", (rows.numel(),), acc))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="partialfc-host-centers")
            # The idle worker thread goes with this object (a test process builds many heads).
            weakref.finalize(self, self._executor.shutdown, wait=False)
        stage.future = self._executor.submit(self._gather, stage, weight)
        self.stages += 1
        self.prefetched += bool(prefetch)
        return HostCenterGrad(rows, self.host_ops, identities, stage)

    def wait_idle(self):
        """Wait until the host thread has finished every stage submitted so far."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()

    def _gather(self, stage, weight):
        """On the host thread: ``(centers [S, D] on the compute device, inv_norm [S] on the host, the copy's
        event or None)``."""
        stage.thread = threading.get_ident()
        num_rows, dim = stage.rows.numel(), weight.shape[1]
        table = self.host_ops
        if stage.buffers is not None:
            # The compute device is the host: the gathered rows are the step's centers, nothing to copy.
            centers, inv_norm = stage.buffers
            table.gather_normalize_out(weight, stage.rows, centers, inv_norm)
            return centers, inv_norm, None
        inv_norm = torch.empty((num_rows,), dtype=accumulation_dtype(weight.dtype))  # stays here for the update
        # This thread's current device is the first GPU until set: pinning and the events belong to the head's.
        with torch.cuda.device(self.device):
            if self._last_copy is not None:
                self._last_copy.synchronize()  # the previous step's copy has finished reading the pinned buffer
            staged = self._pinned_buffer("centers", (num_rows, dim), stage.dtype)
        table.gather_normalize_out(weight, stage.rows, staged, inv_norm)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            centers = torch.empty((num_rows, dim), dtype=stage.dtype, device=self.device)
            centers.copy_(staged, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._last_copy = done
        return centers, inv_norm, done

    def copy_to_host(self, grad):
        """Start copying the centers' gradient [S, D] to the host once the compute stream has written it:
        ``(host tensor, event or None)``; the host tensor is ``grad`` itself when the device is the host."""
        if self.device.type == "cpu":
            return grad, None
        with torch.cuda.device(self.device):
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            host = self._pinned_buffer("grad", tuple(grad.shape), grad.dtype)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            host.copy_(grad, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        grad.record_stream(self._stream)  # the allocator keeps its memory until the copy has read it
        return host, done

    def _pinned_buffer(self, name, shape, dtype):
        # Page-locked, so that the copy engine moves it while both processors go on (a pageable buffer makes
        # a non_blocking copy synchronous). Pinning costs far more than a plain allocation: the buffer is
        # kept, and grown by an eighth more than asked so that a slightly larger S does not pin again.
        numel = math.prod(shape)
        buf = self._pinned.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._pinned[name] = None
            buf = self._pinned[name] = torch.empty((numel + numel // 8,), dtype=dtype, pin_memory=True)
        return buf[:numel].view(shape)


class HostStage:
    """One step's sampled rows on their way to the compute device (see ``HostCenters``)."""

    def __init__(self, owner, rows, dtype, prefetched):
        self.owner, self.rows, self.dtype, self.prefetched = owner, rows, dtype, prefetched
        self.future = None
        self.buffers = None  # (centers, inv_norm) to gather into when the compute device is the host
        self.thread = None  # the thread that gathered the rows

    def wait(self, dtype):
        """``(centers [S, D] in dtype on the compute device, inv_norm [S] on the host)``; the current stream
        waits for the copy (the host does not)."""
        centers, inv_norm, done = self.future.result()
        if done is not None:
            stream = torch.cuda.current_stream(centers.device)
            stream.wait_event(done)
            centers.record_stream(stream)  # allocated on the side stream, read on this one
        if centers.dtype != dtype:
            # A compute dtype other than the staged one (the first step under autocast): cast on the device,
            # and stage the next steps in it.
            centers = centers.to(dtype)
        self.owner.stage_dtype = dtype
        return centers, inv_norm


class HostCenterGrad(CenterGrad):
    """``CenterGrad`` of a host-resident table: ``dWs`` is computed on the compute device and copied to the
    host, where ``normalized_grad`` (and so the inherited updates) read it; ``index`` and ``inv_norm`` are
    host tensors, ``table`` the host op table."""

    def __init__(self, index, table, identities, stage):
        self._device_grad = self._host_grad = self._copied = None
        super().__init__(index, table, identities)
        self.stage = stage

    @property
    def normalized_grad(self):
        """``d loss / d Ws`` [S, D] on the host, or None before backward (waits for the copy)."""
        if self._device_grad is None:
            return None
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self._host_grad

    @normalized_grad.setter
    def normalized_grad(self, value):  # None: CenterGrad.__init__ and clear()
        self._device_grad = self._host_grad = value
        self._copied = None

    def add(self, grad_logits, features, grad_absmax=None):
        """As ``CenterGrad.add``, on the compute device; then the copy to the host starts."""
        if self._copied is not None:
            # The previous micro-batch's copy still reads the gradient this one adds into.
            torch.cuda.current_stream(features.device).wait_event(self._copied)
        compute_ops = self.stage.owner.compute_ops
        grad = self.accumulate(self._device_grad, grad_logits, features,
                               lambda shape, dtype: compute_ops.empty("grad_centers", shape, dtype))
        self._device_grad = grad
        self._host_grad, self._copied = self.stage.owner.copy_to_host(grad)
        self.note_bound(grad, grad_logits, features, grad_absmax)
        self.applied = False

    def is_finite(self):
        grad = self._device_grad
        return grad is None or self.bounded_below_overflow(grad) or all_finite(grad)

    def rows(self):
        """The gradient of the raw rows ``weight[index]`` [S, D] on the host (a new tensor), or None before
        backward."""
        grad = self.normalized_grad
        if grad is None:
            return None
        out = torch.empty_like(grad)
        self.table.gather_normalize_backward_out(grad, self.centers.to(grad.device), self.inv_norm, out)
        return out
