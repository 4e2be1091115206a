"""The Partial FC head: model-parallel margin softmax over sampled class centers.

Class centers are split into contiguous ranges, one per rank. A step on rank r of W:

    x_local [b, D] --allgather--> X [B, D]          (backward: reduce_scatter of dX)
    labels  [b]    --allgather--> Y [B]
    sample: every positive class of this rank + uniform negatives -> index [S], target [B] in [0, S) or -1
    Ws = normalize(weight[index]) [S, D];  logits = normalize(X) @ Ws^T [B, S]
    margin on the target column, scale; per-row (max, sum-exp, target) -> one allgather of [B, 3]
    loss = mean_b(max + log(sum-exp) - target)     (identical on every rank)

The gradient of the sampled rows lands in ``sampled_rows.grad`` [S, D]; ``SparseSGD`` applies it to those
rows only, so no ``[num_local, D]`` gradient ever exists.

With the compiled kernels (``partialfc._C``, ``use_ext=True``) the step runs through ``_FusedMarginSoftmaxLoss``:
the same math with the fused ops, the GEMMs on ``torch.mm`` into buffers that are reused from step to step
(sampled centers, logits, gradient rows), so a step allocates no large tensor. ``sampled_rows.grad`` is then
a view of such a buffer, valid until the next backward. On CPU the logits are held class by class ([S, B];
see ``logits_class_major``) and, in float32, the gradient of the sampled rows is left to the optimizer step
as two factors (see ``_PendingRowGrad``).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..comm import allgather_with_grad, get_comm
from .margins import resolve_margin


class _SampledCenters(torch.autograd.Function):
    """``normalize(weight[index])``; the gradient goes to ``sink`` (a [S, D] stand-in for those rows)."""

    @staticmethod
    def forward(ctx, sink, weight, index, out_dtype, impl=ops):
        normalized, inv_norm = impl.gather_normalize(weight, index, out_dtype)
        ctx.save_for_backward(normalized, inv_norm)
        ctx.impl = impl
        return normalized

    @staticmethod
    def backward(ctx, grad_normalized):
        normalized, inv_norm = ctx.saved_tensors
        return ctx.impl.gather_normalize_backward(grad_normalized, normalized, inv_norm), None, None, None, None


class _DistributedMarginSoftmaxLoss(torch.autograd.Function):
    """Mean cross-entropy of margin logits whose classes are spread over the ranks."""

    @staticmethod
    def forward(ctx, cosines, target, margin, filter_threshold, comm, impl=ops):
        s, m1, m2, m3 = margin
        # The softmax runs in at least float32 even when the GEMM ran in bf16/fp16.
        logits = cosines.detach()
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        row_max, sum_exp, target_logit, target_cos = impl.margin_softmax_forward(
            logits, target, s, m1, m2, m3, filter_threshold)
        loss, global_max, global_sum_exp = _combine_statistics(comm, row_max, sum_exp, target_logit)
        ctx.save_for_backward(logits, target, global_max, global_sum_exp, target_cos)
        ctx.margin, ctx.filter_threshold, ctx.cosine_dtype = margin, filter_threshold, cosines.dtype
        ctx.impl = impl
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, global_max, global_sum_exp, target_cos = ctx.saved_tensors
        s, m1, m2, m3 = ctx.margin
        grad_scale = float(grad_loss) / target.shape[0]
        grad = ctx.impl.margin_softmax_backward(logits, target, global_max, global_sum_exp, target_cos,
                                                s, m1, m2, m3, grad_scale, ctx.filter_threshold)
        return grad.to(ctx.cosine_dtype), None, None, None, None, None


def _combine_statistics(comm, row_max, sum_exp, target_logit):
    """``(loss, global_max [B], global_sum_exp [B])`` from every rank's partial softmax statistics."""
    batch = row_max.shape[0]
    # Horovod: one small collective combines every rank's partial softmax statistics.
    stats = comm.allgather(torch.stack([row_max, sum_exp, target_logit], dim=1)).view(comm.size, batch, 3)
    global_max = stats[:, :, 0].max(dim=0).values  # [B]
    global_sum_exp = (stats[:, :, 1] * torch.exp(stats[:, :, 0] - global_max)).sum(dim=0)  # [B]
    global_target = stats[:, :, 2].sum(dim=0)  # [B]: each row's target lives on exactly one rank
    loss = (global_max + torch.log(global_sum_exp) - global_target).mean()
    return loss, global_max, global_sum_exp


class _Workspace:
    """Buffers the fused path reuses from step to step (on CPU a fresh 200 MB tensor costs more page faults
    than the gather that fills it). ``generation`` counts forwards, so a stale backward is detected."""

    def __init__(self):
        self.buffers = {}
        self.generation = 0

    def get(self, name, shape, dtype, device):
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            self.buffers[name] = None  # free the old one first
            buf = self.buffers[name] = ops.empty_huge((numel,), dtype=dtype, device=device)
        return buf[:numel].view(shape)


class _PendingRowGrad:
    """The sampled rows' gradient of a fused backward, kept unapplied until ``SparseSGD.step`` consumes it in
    one fused kernel (``normalize_backward_sgd_update``) or something reads ``sampled_rows.grad`` and ``rows``
    materializes it. ``applied`` records that an optimizer step already consumed it.

    It is held either as the gradient of the normalized centers (``grad_centers`` [S, D], workspace) or, in
    float32/64, as the two factors of that product, ``grad_centers = grad_logits^T @ features``
    (``grad_logits`` [B, S], ``features`` [B, D]): the optimizer step then forms it block by block, each
    block consumed by the update while it is in cache, so the [S, D] product is never written to memory
    (about 8 ms of a 300 ms step at 1M classes on 2 cores)."""

    BLOCK_ROWS = 2048  # 4 MiB of float32 rows at D = 512: cache-resident between the GEMM and the update
    # Smaller products are formed in the backward: they fit in a server CPU's last-level cache anyway, and
    # the per-block calls would cost more than the memory traffic saved (100K classes: 20 MB).
    MIN_FACTORED_BYTES = 64 << 20

    @classmethod
    def factor(cls, num_sample, dim, dtype):
        """Whether a deferred gradient of [num_sample, dim] in ``dtype`` is kept as its two factors."""
        return num_sample * dim * torch.finfo(dtype).bits // 8 >= cls.MIN_FACTORED_BYTES

    def __init__(self, centers, inv_norm, generation, grad_centers=None, grad_logits=None, features=None):
        self.centers, self.inv_norm = centers, inv_norm
        self.grad_centers, self.grad_logits, self.features = grad_centers, grad_logits, features
        self.generation = generation
        self.applied = False

    @torch.no_grad()
    def _grad_centers(self, ws):
        if self.grad_centers is None:
            out = ws.get("grad_rows", self.centers.shape, self.inv_norm.dtype, self.inv_norm.device)
            self.grad_centers = torch.mm(self.grad_logits.t(), self.features, out=out)
            self.grad_logits = self.features = None
        return self.grad_centers

    def rows(self, ws):
        """The gradient of the raw rows [S, D] (``gather_normalize_backward``), in the workspace."""
        grad_centers = self._grad_centers(ws)
        rows = ws.get("grad_rows", grad_centers.shape, self.inv_norm.dtype, self.inv_norm.device)
        # In place when grad_centers is the rows buffer.
        torch.ops.partialfc.gather_normalize_backward_out(grad_centers, self.centers, self.inv_norm, rows)
        return rows

    def is_finite(self):
        """Whether the gradient is finite. For the factored form: both factors finite (their product cannot
        overflow: |features| <= 1 per row and the logits' gradient is bounded by s times the loss scale)."""
        if self.grad_centers is not None:
            return bool(torch.isfinite(self.grad_centers).all())
        return bool(torch.isfinite(self.grad_logits).all()) and bool(torch.isfinite(self.features).all())

    @torch.no_grad()
    def apply_update(self, ws, weight, momentum_buffer, index, lr, momentum, weight_decay, grad_scale):
        """``normalize_backward_sgd_update`` of this gradient, by blocks of rows in the factored form."""
        if self.grad_centers is not None:
            ops.normalize_backward_sgd_update(weight, momentum_buffer, index, self.grad_centers, self.inv_norm, lr,
                                              momentum, weight_decay, grad_scale)
            return
        grad_logits_t = self.grad_logits.t()  # [S, B]
        num_sample = grad_logits_t.shape[0]
        for start in range(0, num_sample, self.BLOCK_ROWS):
            stop = min(start + self.BLOCK_ROWS, num_sample)
            block = ws.get("grad_block", (stop - start, self.features.shape[1]), self.features.dtype,
                           self.features.device)
            torch.mm(grad_logits_t[start:stop], self.features, out=block)
            ops.normalize_backward_sgd_update(weight, momentum_buffer, index[start:stop], block,
                                              self.inv_norm[start:stop], lr, momentum, weight_decay, grad_scale)


def logits_class_major(device):
    """Whether the fused path holds its logits class by class ([S, B] row-major, handed to the ops as the
    [B, S] transpose): on CPU, where MKL runs the forward GEMM into that layout (centers @ features^T) 12-14%
    faster than features @ centers^T into [B, S]; the margin-softmax kernels have a class-major variant."""
    return torch.device(device).type == "cpu"


def _logits_buffer(ws, name, batch, num_sample, dtype, device):
    """A reused [B, S] logits buffer in the fused path's layout (see ``logits_class_major``)."""
    if logits_class_major(device):
        return ws.get(name, (num_sample, batch), dtype, device).t()
    return ws.get(name, (batch, num_sample), dtype, device)


def _mm_into(a, b, out):
    """``out = a @ b`` for an ``out`` that may be the transpose of a contiguous buffer: then the GEMM writes
    ``out^T = b^T @ a^T`` straight into that buffer."""
    if out.is_contiguous():
        return torch.mm(a, b, out=out)
    torch.mm(b.t(), a.t(), out=out.t())
    return out


class _FusedMarginSoftmaxLoss(torch.autograd.Function):
    """The head's step on the compiled kernels: gather-normalize, GEMM, margin softmax and their backward.

    ``features`` [B, D] are the normalized embeddings in the compute dtype. The gradient of the sampled raw
    rows is written into the workspace and set as ``sink.grad`` directly (handing it to autograd would make
    it copy the buffer, since the workspace keeps a reference).
    """

    @staticmethod
    def forward(ctx, features, sink, weight, index, target, head):
        ws, device = head._workspace, weight.device
        num_sample, dim, batch = index.numel(), weight.shape[1], features.shape[0]
        compute_dtype, acc_dtype = features.dtype, sink.dtype
        with torch.autocast(device.type, enabled=False):
            centers = ws.get("centers", (num_sample, dim), compute_dtype, device)
            inv_norm = ws.get("inv_norm", (num_sample,), acc_dtype, device)
            torch.ops.partialfc.gather_normalize_out(weight, index, centers, inv_norm)
            logits = _logits_buffer(ws, "logits", batch, num_sample, acc_dtype, device)  # [B, S]
            if compute_dtype == acc_dtype:
                _mm_into(features, centers.t(), logits)
            else:
                low = _logits_buffer(ws, "logits_lowp", batch, num_sample, compute_dtype, device)
                logits.copy_(_mm_into(features, centers.t(), low))
            s, m1, m2, m3 = head.margin
            row_max, sum_exp, target_logit, target_cos = torch.ops.partialfc.margin_softmax_forward(
                logits, target, s, m1, m2, m3, head.interclass_filtering_threshold)
            loss, global_max, global_sum_exp = _combine_statistics(head.comm, row_max, sum_exp, target_logit)
        ws.generation += 1
        ctx.generation, ctx.head, ctx.sink = ws.generation, head, sink
        ctx.save_for_backward(features)
        ctx.buffers = (centers, inv_norm, logits, target, global_max, global_sum_exp, target_cos)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        head = ctx.head
        ws = head._workspace
        if ctx.generation != ws.generation:
            raise RuntimeError("PartialFC (fused kernels) reuses its buffers from step to step: backward must "
                               "follow the forward that produced the loss, before the next forward. Construct "
                               "PartialFC(..., use_ext=False) to keep several graphs alive.")
        (features,) = ctx.saved_tensors
        centers, inv_norm, logits, target, global_max, global_sum_exp, target_cos = ctx.buffers
        ctx.buffers = None
        s, m1, m2, m3 = head.margin
        grad_scale = float(grad_loss) / target.shape[0]
        compute_dtype, acc_dtype, device = features.dtype, logits.dtype, logits.device
        num_sample, dim = centers.shape
        with torch.autocast(device.type, enabled=False):
            torch.ops.partialfc.margin_softmax_backward(logits, target, global_max, global_sum_exp, target_cos,
                                                        s, m1, m2, m3, grad_scale,
                                                        head.interclass_filtering_threshold)
            grad_logits = logits
            if compute_dtype != acc_dtype:
                grad_logits = _logits_buffer(ws, "logits_lowp", *logits.shape, compute_dtype, device).copy_(logits)
            grad_features = torch.mm(grad_logits, centers) if ctx.needs_input_grad[0] else None
            if ctx.needs_input_grad[1]:
                defer = head._can_defer(ctx.sink)
                # (defer implies the CPU kernels, hence class-major logits)
                if defer and compute_dtype == acc_dtype and _PendingRowGrad.factor(num_sample, dim, acc_dtype):
                    # The product grad_logits^T @ features is left to the optimizer step (see _PendingRowGrad).
                    # Not for float16 compute, whose product can overflow where both factors are finite.
                    pending = _PendingRowGrad(centers, inv_norm, ws.generation, grad_logits=grad_logits,
                                              features=features.detach())
                else:
                    # The gradient of the normalized centers [S, D]; in the acc dtype it lands in the rows buffer.
                    grad_centers = ws.get("grad_rows", (num_sample, dim), acc_dtype, device)
                    if compute_dtype != acc_dtype:
                        grad_centers = ws.get("grad_centers_lowp", (num_sample, dim), compute_dtype, device)
                    # (with class-major logits, grad_logits.t() is contiguous)
                    torch.mm(grad_logits.t(), features, out=grad_centers)
                    pending = _PendingRowGrad(centers, inv_norm, ws.generation, grad_centers=grad_centers)
                if defer:
                    # SparseSGD.step folds the normalize backward into the update (or sampled_rows
                    # materializes the rows when read first).
                    head._pending_grad = pending
                else:
                    rows = pending.rows(ws)
                    if ctx.sink.grad is None:
                        # Accumulating micro-batches: the next backward reuses this buffer, so keep a copy.
                        ctx.sink.grad = rows.clone() if head.holding_sample else rows
                    else:
                        ctx.sink.grad.add_(rows)
        return grad_features, None, None, None, None, None


def partition_classes(num_classes, rank, world_size):
    """``(class_start, num_local)``: contiguous ranges, the first ``num_classes % world_size`` ranks one longer."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class PartialFC(nn.Module):
    """Margin-softmax classification head over this rank's shard of the class centers.

    ``loss = pfc(local_embeddings [b, D], local_labels [b])`` is the mean loss over the global batch (the
    same on every rank); its backward gives each rank the single-process gradient rows of its own samples.
    """

    def __init__(self, embedding_size, num_classes, sample_rate=1.0, margin=(64.0, 1.0, 0.5, 0.0), comm=None,
                 interclass_filtering_threshold=0.0, seed=2048, use_ext=True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.comm = comm if comm is not None else get_comm()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.margin = resolve_margin(margin)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold or 0.0)
        self.class_start, self.num_local = partition_classes(num_classes, self.comm.rank, self.comm.size)
        self.num_sample = min(self.num_local, math.ceil(sample_rate * self.num_local))
        init = torch.Generator().manual_seed(seed + self.comm.rank)
        # Class centers are updated by SparseSGD only; autograd never sees them as a leaf.
        # Huge pages (where the OS allows) for the table: each step touches S scattered rows of it.
        weight = ops.empty_huge((self.num_local, embedding_size), torch.float32)
        self.weight = nn.Parameter(weight.normal_(0, 0.01, generator=init), requires_grad=False)
        self.sampler = torch.Generator().manual_seed(seed * 7919 + self.comm.rank)
        self.sampled_index = None  # [S] local class ids of the current step
        self.holding_sample = False  # see hold_sample()
        self._pending_grad = None  # a _PendingRowGrad of the fused CPU path, see sampled_rows
        self.sampled_rows = None   # [S, D] stand-in leaf whose .grad is the gradient of weight[sampled_index]
        # use_ext: the compiled kernels of partialfc._C when they are loaded (PARTIALFC_DISABLE_EXT=1 also
        # turns them off); False forces the pure-PyTorch reference ops.
        self.use_ext = bool(use_ext)
        self._ops = ops.implementation(self.use_ext)
        self._workspace = _Workspace()

    @property
    def sampled_rows(self):
        """``[S, D]`` stand-in leaf of this step's sampled rows; ``.grad`` is the gradient of
        ``weight[sampled_index]`` after backward (materialized here if the fused path deferred it)."""
        self._materialize_grad()
        return self._sampled_rows

    @sampled_rows.setter
    def sampled_rows(self, value):
        self._pending_grad = None
        self._sampled_rows = value

    def _can_defer(self, sink):
        """Whether a fused backward may leave the rows' gradient to the optimizer step: CPU kernel available,
        no accumulation over micro-batches, and nothing accumulated in ``sink.grad`` yet."""
        return (sink is self._sampled_rows and sink.grad is None and self._pending_grad is None
                and not self.holding_sample and ops.fused_update_available(self.weight.device))

    def _materialize_grad(self):
        pending = self._pending_grad
        if pending is None:
            return
        self._pending_grad = None
        if pending.generation != self._workspace.generation:
            raise RuntimeError("PartialFC: the deferred gradient of the sampled rows was overwritten by a later "
                               "forward before it was used")
        self._sampled_rows.grad = pending.rows(self._workspace)

    def _take_pending_grad(self):
        """For ``SparseSGD.step``: the deferred gradient (marked applied) when the fused update may consume
        it, else None, with ``sampled_rows.grad`` materialized if it was deferred."""
        pending = self._pending_grad
        if pending is not None and not pending.applied and pending.generation == self._workspace.generation:
            pending.applied = True  # a second step without a new backward materializes and reapplies it
            return pending
        self._materialize_grad()
        return None

    def center_grad_is_finite(self):
        """Whether this step's gradient of the sampled rows is finite, checked without materializing a
        deferred one (so the optimizer step keeps its fused update)."""
        pending = self._pending_grad
        if pending is not None:
            return pending.is_finite()
        rows = self._sampled_rows
        return rows is None or rows.grad is None or bool(torch.isfinite(rows.grad).all())

    def _clear_grad(self):
        """Drop this step's gradient of the sampled rows (deferred or materialized)."""
        self._pending_grad = None
        if self._sampled_rows is not None:
            self._sampled_rows.grad = None

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"class_start={self.class_start}, num_local={self.num_local}, num_sample={self.num_sample}, "
                f"margin={self.margin}")

    def _gather_labels(self, local_embeddings, local_labels):
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [batch, {self.embedding_size}], got {list(local_embeddings.shape)}")
        if local_labels.dim() != 1 or local_labels.shape[0] != local_embeddings.shape[0]:
            raise ValueError(f"labels must be [batch] = [{local_embeddings.shape[0]}], got {list(local_labels.shape)}")
        comm = self.comm
        # Horovod: every rank must hold the same batch size, or the gathered rows would not line up.
        sizes = comm.allgather(torch.tensor([local_labels.shape[0]], dtype=torch.long, device=local_labels.device))
        if bool((sizes != sizes[0]).any()):
            raise ValueError(f"every rank needs the same local batch size; got {sizes.tolist()} on ranks "
                             f"0..{comm.size - 1} (use drop_last in the data loader)")
        labels = comm.allgather(local_labels.long())  # [B]
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            pos = int(torch.nonzero(bad)[0])
            batch = local_labels.shape[0]
            raise ValueError(f"label {int(labels[pos])} of sample {pos % batch} on rank {pos // batch} is outside "
                             f"[0, num_classes={self.num_classes})")
        return labels

    def sample(self, labels):
        """``(index [S], target [B])`` for the global labels; see ``ops.sample_classes_ref``."""
        return self._ops.sample_classes(labels, self.class_start, self.num_local, self.num_sample, self.sampler)

    def hold_sample(self, local_labels_list):
        """Sample once for several micro-batches (a list of their local label tensors), and reuse that sample
        in each forward until ``hold_sample(None)``; the centers' gradients then accumulate in
        ``sampled_rows.grad``, exactly as one forward over the concatenated batch would give them."""
        if local_labels_list is None:
            self.holding_sample = False
            return
        labels = torch.cat([self.comm.allgather(lab.long()) for lab in local_labels_list])
        self._start_sample(self.sample(labels)[0])
        self.holding_sample = True

    def _start_sample(self, index):
        """Make ``index`` the current sample, with a fresh stand-in for its rows' gradient."""
        self.sampled_index = index
        acc_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        # The stand-in costs no memory: a zero-stride view; only its gradient is materialized.
        self.sampled_rows = torch.zeros((), dtype=acc_dtype, device=self.weight.device).expand(
            index.numel(), self.embedding_size).requires_grad_()

    def forward(self, local_embeddings, local_labels):
        labels = self._gather_labels(local_embeddings, local_labels)  # [B]
        embeddings = allgather_with_grad(local_embeddings, self.comm)  # [B, D]

        weight = self.weight
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        if self.holding_sample:
            # Micro-batches of one optimizer step share the sample and the stand-in, so gradients add up.
            index, target = self.sampled_index, ops.remap_labels(labels, self.class_start, self.num_local,
                                                                    self.sampled_index)
        else:
            index, target = self.sample(labels)  # [S], [B]
            self._start_sample(index)

        device_type = embeddings.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else torch.promote_types(embeddings.dtype, weight.dtype))
        if self.use_ext and ops.use_fused(weight.device):
            features = F.normalize(embeddings.to(acc_dtype), dim=1).to(compute_dtype)  # [B, D]
            return _FusedMarginSoftmaxLoss.apply(features, self.sampled_rows, weight, index, target, self)
        centers = _SampledCenters.apply(self.sampled_rows, weight, index, compute_dtype, self._ops)  # [S, D]
        features = F.normalize(embeddings.to(acc_dtype), dim=1).to(compute_dtype)  # [B, D]
        cosines = torch.mm(features, centers.t())  # [B, S]
        return _DistributedMarginSoftmaxLoss.apply(cosines, target, self.margin,
                                                   self.interclass_filtering_threshold, self.comm, self._ops)
