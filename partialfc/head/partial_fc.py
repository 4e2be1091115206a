"""The Partial FC head: model-parallel margin softmax over sampled class centers.

Class centers are split into contiguous ranges, one per rank. A step on rank r of W, top to bottom in
``PartialFC.forward`` and ``MarginSoftmaxLoss``:

    labels  [b]    --allgather--> Y [B]
    sample: every positive class of this rank + uniform negatives -> index [S], target [B] in [0, S) or -1
    x_local [b, D] --allgather--> X [B, D]          (backward: reduce_scatter of dX)
    Ws = normalize(weight[index]) [S, D];  logits = normalize(X) @ Ws^T [B, S]
    margin on the target column, scale; per-row (max, sum-exp, target) -> one allgather of [B, 3]
    loss = mean_b(max + log(sum-exp) - target)     (identical on every rank)

The backward returns dX to autograd and leaves the gradient of the sampled centers in ``head.center_grad``
(a ``CenterGrad``); ``SparseSGD`` applies it to those rows only, so no ``[num_local, D]`` gradient exists.

The step is one code over an op table (``partialfc.ops.op_table``): the compiled kernels of
``partialfc._C`` (``use_ext=True``, the default) or the pure-PyTorch references (``use_ext=False``).

The adaptive margins (AdaFace, CurricularFace; docs/margins.md) run the ``*_adaptive`` margin ops with
per-sample arguments from running statistics that the head keeps as buffers (``head_state()``). Every rank
computes them from the whole global batch, so they are the same on every rank.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..comm import allgather_with_grad, get_comm
from ..ops import accumulation_dtype, compute_dtype
from .margins import AdaFace, CurricularFace, resolve_margin
from .precision import fill_normal_, is_low_precision, resolve_center_dtype


def all_finite(tensor):
    """Whether every element of ``tensor`` is finite, from one sum: a NaN or an infinity makes the sum NaN or
    infinite. One pass; ``torch.isfinite(t).all()`` makes four on CPU (abs, two compares, all), which cost 0.44 s
    for a [200K, 512] gradient on 2 cores against 0.02 s. Finite elements could only sum to an infinity beyond
    3e38, which no gradient reaches (and would skip a step, not take a bad one)."""
    return bool(torch.isfinite(tensor.sum(dtype=accumulation_dtype(tensor.dtype))))  # float16: summed in float32


class CenterGrad:
    """The gradient of one step's sampled class centers, ``weight[index]`` [S, D].

    It is held as the gradient of the normalized centers (``d loss / d Ws`` [S, D], accumulation dtype),
    with the forward's normalized rows and inverse norms, so that the optimizer can fold the normalize
    backward into the sparse update (``normalize_backward_sgd_update``, ``normalize_backward_adamw_update``).
    Micro-batches that share one sample (``PartialFC.hold_sample``) add into it: the normalize backward is
    linear in that gradient.

    ``reuse_centers`` (a low-precision table's step, without ``hold_sample``): the gradient is written over the
    forward's centers once the backward has used them for ``grad_features``, instead of into a second [S, D]
    buffer, which at the largest class counts is the difference between fitting and not (docs/memory.md). The
    update recomputes the normalized rows from the table anyway; ``rows()`` does so too, and a second
    ``step()`` on the same gradient, which needs the forward's rows after the table has moved, is refused.
    """

    def __init__(self, index, table, identities=None, reuse_centers=False):
        self.reuse_centers = reuse_centers
        self.weight = None  # the table, set by the forward (rows() recomputes reused centers from it)
        self.index = index  # [S] sorted rows of the table (with K sub-centers, [S*K]: all K rows of each identity)
        self.identities = index if identities is None else identities  # [S] sorted local class ids
        self.table = table
        self.centers = self.inv_norm = None  # [S, D] compute dtype, [S]: set by the forward
        self.normalized_grad = None  # [S, D]: set by the backward
        self.applied = False  # whether an optimizer step consumed it (the table has moved since)
        self._clear_bound()
        # Autograd runs a Function's backward only when an input requires grad. The centers' gradient is not
        # an autograd tensor, so this empty leaf stands for it: the loss is differentiable even when the
        # embeddings are not (a head trained on fixed features).
        self.anchor = torch.empty(0, requires_grad=True)

    stage = None  # host-resident centers: the HostStage that gathers this sample's rows (host_centers.py)

    def add(self, grad_logits, features, grad_absmax=None):
        """Add ``grad_logits^T @ features`` ([S, B] @ [B, D]), the gradient of the normalized centers.
        ``grad_absmax``: the margin backward's largest ``|grad_logits|`` (see ``is_finite``)."""
        self.normalized_grad = self.accumulate(self.normalized_grad, grad_logits, features, self._new_grad)
        self.note_bound(self.normalized_grad, grad_logits, features, grad_absmax)
        self.applied = False

    def _new_grad(self, shape, dtype):
        if self.reuse_centers and self.centers.dtype == dtype and self.centers.is_contiguous():
            out, self.centers = self.centers, None  # [S, D]: grad_features has read the centers
            return out
        return self.table.empty("grad_centers", shape, dtype)

    def accumulate(self, grad, grad_logits, features, new_buffer):
        """``grad + grad_logits^T @ features`` [S, D], in place; ``grad`` None: into ``new_buffer(shape,
        dtype)``. The gradient is held in the accumulation dtype, a low-precision product formed in its dtype
        and added in float32; under ``reuse_centers`` (one product, nothing to add up) a low-precision product
        is held as the GEMM writes it, over the centers: the same values in half the bytes, and no second
        [S, D] buffer."""
        acc = self.inv_norm.dtype
        if grad is None:
            if grad_logits.dtype != acc and self.reuse_centers:
                grad = new_buffer(self.centers.shape, grad_logits.dtype)
                return torch.mm(grad_logits.t(), features, out=grad)
            grad = new_buffer(self.centers.shape, acc)
            if grad_logits.dtype == acc:
                torch.mm(grad_logits.t(), features, out=grad)
            else:
                grad.copy_(torch.mm(grad_logits.t(), features))
        elif grad_logits.dtype == acc:
            grad.addmm_(grad_logits.t(), features)
        else:
            grad.add_(torch.mm(grad_logits.t(), features))
        return grad

    def clear(self):
        self.normalized_grad = None
        self._clear_bound()

    # The finiteness check. The gradient is sum_b grad_logits[b, j] * features[b, :], so its magnitude is at
    # most (rows added) * max|grad_logits| * max|features|; the margin backward folds max|grad_logits| into
    # grad_absmax as it writes them (NaN if one is NaN), and max|features| is one small [B, D] reduction. When
    # that bound stays below half the largest value of the product's dtype, no element can have overflowed,
    # and a 4-byte read replaces a pass over the [S, D] gradient. Otherwise (a non-finite or huge gradient of
    # the logits: a bad batch, fp16 loss scaling), or when something else has written into the gradient since
    # (its version counter moved), the gradient itself is checked.

    def _clear_bound(self):
        self.grad_absmax = None  # float32 [1] on the compute device, for the margin backward to fold into
        self._feature_absmax = None
        self._bound_rows = 0
        self._bound_limit = math.inf
        self._bounded = True  # every add came with the margin backward's grad_absmax
        self._bound_version = None  # the gradient tensor's version when the bound was last taken

    def absmax_buffer(self, device):
        """The margin backward's ``grad_absmax`` for this gradient, zero before its first backward."""
        if self.grad_absmax is None:
            self.grad_absmax = torch.zeros(1, dtype=torch.float32, device=device)
        return self.grad_absmax

    def note_bound(self, grad, grad_logits, features, grad_absmax):
        """Takes the bound of ``grad`` after an add of ``grad_logits^T @ features``."""
        self._bound_version = grad._version
        if grad_absmax is None:
            self._bounded = False
            return
        largest = features.detach().abs().amax().to(torch.float32)
        self._feature_absmax = largest if self._feature_absmax is None else torch.maximum(self._feature_absmax,
                                                                                           largest)
        self._bound_rows += features.shape[0]
        self._bound_limit = min(self._bound_limit, torch.finfo(grad_logits.dtype).max / 2)

    def bounded_below_overflow(self, grad):
        """Whether the bound above proves every element of ``grad`` finite (one read of a device scalar)."""
        if not self._bounded or self.grad_absmax is None or self._feature_absmax is None:
            return False
        if grad._version != self._bound_version:
            return False  # written since the bound was taken
        bound = float((self.grad_absmax * self._feature_absmax).item()) * self._bound_rows
        return bound <= self._bound_limit  # False for NaN and inf

    def is_finite(self):
        """Whether the gradient is finite (True when there is none)."""
        grad = self.normalized_grad
        return grad is None or self.bounded_below_overflow(grad) or all_finite(grad)

    def rows(self):
        """The gradient of the raw rows ``weight[index]`` [S, D] (a new tensor), or None before backward."""
        if self.normalized_grad is None:
            return None
        centers = self.centers
        if centers is None:  # reuse_centers: the forward's rows, recomputed from the table
            if self.applied:
                raise RuntimeError("a second optimizer step on one backward's gradient needs the forward's "
                                   "normalized centers, which a step with a bfloat16/float16 table or compute "
                                   "dtype overwrites with their gradient to save memory: run forward and "
                                   "backward again")
            centers = self.weight.index_select(0, self.index).to(self.inv_norm.dtype).mul_(self.inv_norm[:, None])
        out = torch.empty_like(self.normalized_grad, dtype=self.inv_norm.dtype)  # held in bf16 under reuse_centers
        self.table.gather_normalize_backward_out(self.normalized_grad, centers, self.inv_norm, out)
        return out

    @torch.no_grad()
    def sgd_update(self, weight, momentum_buffer, lr, momentum, weight_decay, grad_scale=1.0, rounding=None):
        """SGD with momentum on the rows ``index`` of ``weight`` for this gradient divided by ``grad_scale``;
        ``rounding``: the update ops' stochastic-rounding arguments (``rounding_seed``, ``rounding_step``,
        ``class_start``) for a low-precision table."""
        if self.normalized_grad is None:
            return
        rounding = rounding or {}
        if not self.applied:
            # The table still holds the rows the forward normalized: the kernel recomputes them from it.
            self.table.normalize_backward_sgd_update(weight, momentum_buffer, self.index, self.normalized_grad,
                                                     self.inv_norm, lr, momentum, weight_decay, grad_scale,
                                                     **rounding)
        else:
            # A second step on the same gradient (as torch optimizers allow): the table has moved, so the
            # rows' gradient comes from the forward's normalized centers.
            rows = self.rows()
            if grad_scale != 1.0:
                rows.div_(grad_scale)
            self.table.sparse_sgd_update(weight, momentum_buffer, self.index, rows, lr, momentum, weight_decay,
                                         **rounding)
        self.applied = True

    @torch.no_grad()
    def adamw_update(self, weight, exp_avg, exp_avg_sq, row_step, lr, beta1, beta2, eps, weight_decay,
                     grad_scale=1.0, rounding=None):
        """AdamW on the rows ``index`` of ``weight`` for this gradient divided by ``grad_scale``, each row with
        its own step count in ``row_step``; ``rounding`` as in ``sgd_update``."""
        if self.normalized_grad is None:
            return
        rounding = rounding or {}
        if not self.applied:
            # As in sgd_update: the table still holds the rows the forward normalized.
            self.table.normalize_backward_adamw_update(weight, exp_avg, exp_avg_sq, row_step, self.index,
                                                       self.normalized_grad, self.inv_norm, lr, beta1, beta2, eps,
                                                       weight_decay, grad_scale, **rounding)
        else:
            rows = self.rows()
            if grad_scale != 1.0:
                rows.div_(grad_scale)
            self.table.sparse_adamw_update(weight, exp_avg, exp_avg_sq, row_step, self.index, rows, lr, beta1, beta2,
                                           eps, weight_decay, **rounding)
        self.applied = True


def global_target_cos(logits, target, comm):
    """The clamped target cosine of every sample of the global batch [B], from the rank holding its class
    (``logits`` [B, S] still holds the cosines)."""
    rows = torch.nonzero(target >= 0).squeeze(1)
    local = torch.zeros(target.shape[0], dtype=logits.dtype, device=logits.device)
    local[rows] = logits[rows, target[rows]].clamp(-1.0, 1.0)
    # Each sample's target lives on exactly one rank: the sum over ranks adds zeros to it, exactly.
    return comm.allgather(local).view(comm.size, -1).sum(dim=0)


class AdaptiveArgs:
    """The adaptive margin ops' extra arguments for one step. AdaFace's per-sample margins are known before
    the forward (from the feature norms); CurricularFace's hard-negative threshold needs every sample's target
    cosine, so ``resolve`` computes it from the step's cosines (one [B] allgather) and moves the running t."""

    def __init__(self, sample_m2=None, sample_m3=None, clip_eps=0.0, curricular=None, state=None, update=False):
        self.kwargs = dict(sample_m2=sample_m2, sample_m3=sample_m3, clip_eps=clip_eps, hard_threshold=None,
                           hard_t=0.0)
        self.curricular, self.state, self.update = curricular, state, update

    def resolve(self, logits, target, comm):
        if self.curricular is not None:
            threshold, t = self.curricular.hard_threshold(global_target_cos(logits, target, comm), self.state,
                                                          self.update)
            self.kwargs.update(hard_threshold=threshold, hard_t=t)
        return self.kwargs


def combine_statistics(comm, row_max, sum_exp, target_logit):
    """``(loss, global_max [B], global_sum_exp [B])`` from every rank's partial softmax statistics."""
    batch = row_max.shape[0]
    # One small collective combines every rank's partial statistics [B, 3].
    stats = comm.allgather(torch.stack([row_max, sum_exp, target_logit], dim=1)).view(comm.size, batch, 3)
    global_max = stats[:, :, 0].max(dim=0).values  # [B]
    global_sum_exp = (stats[:, :, 1] * torch.exp(stats[:, :, 0] - global_max)).sum(dim=0)  # [B]
    global_target = stats[:, :, 2].sum(dim=0)  # [B]: each row's target lives on exactly one rank
    loss = (global_max + torch.log(global_sum_exp) - global_target).mean()
    return loss, global_max, global_sum_exp


class MarginSoftmaxLoss(torch.autograd.Function):
    """Mean margin-softmax cross-entropy of ``features`` [B, D] (normalized, compute dtype) against the
    sampled centers ``weight[center_grad.index]``, whose classes are spread over the ranks.

    Backward returns the gradient of ``features`` and adds the gradient of the sampled centers into
    ``center_grad``. The GEMMs run in the features' dtype; the statistics in the accumulation dtype, and the
    centers' gradient too, or in the product's dtype over the centers (``CenterGrad.reuse_centers``); the logits
    and their gradient in the accumulation dtype, or in place in the features' low-precision dtype where the
    table says so (``OpTable.margin_in_compute_dtype``).
    """

    @staticmethod
    def forward(ctx, features, anchor, weight, target, center_grad, margin, filter_threshold, comm, table,
                adaptive=None, num_subcenters=1):
        index = center_grad.index
        batch, num_sample, dim = features.shape[0], index.numel(), weight.shape[1]
        acc = accumulation_dtype(weight.dtype)
        s, m1, m2, m3 = margin
        with torch.autocast(features.device.type, enabled=False):
            if center_grad.stage is None:
                centers = table.empty("centers", (num_sample, dim), features.dtype)  # [S, D]
                inv_norm = table.empty("inv_norm", (num_sample,), acc)  # [S]
                table.gather_normalize_out(weight, index, centers, inv_norm)
            else:
                # Host-resident table: the host gathered and normalized the rows, inv_norm stays there.
                centers, inv_norm = center_grad.stage.wait(features.dtype)
            if features.dtype == acc or table.margin_in_compute_dtype:
                # [B, S] in the GEMM's dtype; bfloat16 / float16 logits are transformed there in place
                logits = table.empty_logits("logits", batch, num_sample, features.dtype)
                table.mm_into(features, centers.t(), logits)
            else:
                # [B, S] float32 copy of the low-precision GEMM's output (see OpTable.margin_in_compute_dtype)
                logits = table.empty_logits("logits", batch, num_sample, acc)
                low = table.empty_logits("logits_lowp", batch, num_sample, features.dtype)
                logits.copy_(table.mm_into(features, centers.t(), low))
            argmax = None
            if num_subcenters > 1:
                # Sub-center ArcFace: an identity's cosine is its nearest sub-center's [B, S]; the margin softmax
                # runs on those, and the backward sends each gradient to that sub-center (argmax [B, S]).
                logits, argmax = table.subcenter_max(logits, num_subcenters)
            # Clamp, margin on the target column, scale, in place (or, where the table says so, read only: the
            # backward derives the logits from the cosines again); one online pass for the row statistics.
            adaptive_kwargs = None
            store = not table.margin_reads_cosines
            if adaptive is None:
                row_max, sum_exp, target_logit, target_cos = table.margin_softmax_forward(
                    logits, target, s, m1, m2, m3, filter_threshold, store_logits=store)  # each [B]
            else:
                adaptive_kwargs = adaptive.resolve(logits, target, comm)
                row_max, sum_exp, target_logit, target_cos = table.margin_softmax_forward_adaptive(
                    logits, target, s, m1, m2, m3, filter_threshold, **adaptive_kwargs, store_logits=store)
            loss, global_max, global_sum_exp = combine_statistics(comm, row_max, sum_exp, target_logit)
        center_grad.centers, center_grad.inv_norm, center_grad.weight = centers, inv_norm, weight
        table.generation += 1
        ctx.generation, ctx.table, ctx.center_grad = table.generation, table, center_grad
        ctx.margin, ctx.filter_threshold, ctx.adaptive_kwargs = margin, filter_threshold, adaptive_kwargs
        ctx.save_for_backward(features)
        ctx.buffers = (centers, logits, target, global_max, global_sum_exp, target_cos)
        ctx.subcenters = (num_subcenters, argmax)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        table = ctx.table
        if table.reuses_buffers and ctx.generation != table.generation:
            raise RuntimeError("PartialFC (compiled CPU kernels) reuses its buffers from step to step: backward "
                               "must follow the forward that produced the loss, before the next forward. "
                               "Construct PartialFC(..., use_ext=False) to keep several graphs alive.")
        (features,) = ctx.saved_tensors
        centers, logits, target, global_max, global_sum_exp, target_cos = ctx.buffers
        ctx.buffers = None
        s, m1, m2, m3 = ctx.margin
        with torch.autocast(logits.device.type, enabled=False):
            # In place over the logits: (softmax - onehot) * s, times the margin's derivative on the target
            # column, times d(loss)/d(mean) / B.
            grad_scale = float(grad_loss) / target.shape[0]
            # The largest |gradient| written, for the finiteness check (CenterGrad.is_finite).
            grad_absmax = ctx.center_grad.absmax_buffer(logits.device)  # [1]
            from_cosines = table.margin_reads_cosines  # the forward left the cosines
            if ctx.adaptive_kwargs is None:
                table.margin_softmax_backward(logits, target, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                              grad_scale, ctx.filter_threshold, grad_absmax, from_cosines)
            else:
                table.margin_softmax_backward_adaptive(logits, target, global_max, global_sum_exp, target_cos, s, m1,
                                                       m2, m3, grad_scale, ctx.filter_threshold,
                                                       **ctx.adaptive_kwargs, grad_absmax=grad_absmax,
                                                       from_cosines=from_cosines)
            grad_logits = logits  # [B, S]
            num_subcenters, argmax = ctx.subcenters
            if argmax is not None:
                grad_logits = table.subcenter_max_backward(logits, argmax, num_subcenters)  # [B, S*K]
            if features.dtype != grad_logits.dtype:
                grad_logits = table.empty_logits("logits_lowp", *grad_logits.shape, features.dtype).copy_(grad_logits)
            grad_features = torch.mm(grad_logits, centers) if ctx.needs_input_grad[0] else None  # [B, D]
            ctx.center_grad.add(grad_logits, features, grad_absmax)  # [S, D]
        return grad_features, None, None, None, None, None, None, None, None, None, None


def partition_classes(num_classes, rank, world_size):
    """``(class_start, num_local)``: contiguous ranges, the first ``num_classes % world_size`` ranks one longer."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class PartialFC(nn.Module):
    """Margin-softmax classification head over this rank's shard of the class centers.

    ``loss = pfc(local_embeddings [b, D], local_labels [b])`` is the mean loss over the global batch (the
    same on every rank); its backward gives each rank the single-process gradient of its own samples, and
    ``pfc.center_grad`` the gradient of this rank's sampled centers.

    ``center_dtype`` ("float32", "bfloat16", "float16") is the storage of the table and of its optimizer state;
    the step computes in float32 either way, and the optimizers round low-precision writes stochastically
    (``partialfc.head.precision``, docs/memory.md).

    ``center_device="cpu"`` keeps the table and its optimizer state in host memory whatever ``.to()`` says; each
    step's sampled rows are gathered there and staged for the compute device (``partialfc.head.host_centers``,
    docs/kernels.md). ``""`` or ``"auto"``: the table lives on the module's device.
    """

    def __init__(self, embedding_size, num_classes, sample_rate=1.0, margin=(64.0, 1.0, 0.5, 0.0), comm=None,
                 interclass_filtering_threshold=0.0, seed=2048, use_ext=True, num_subcenters=1,
                 center_dtype="float32", center_device=""):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if int(num_subcenters) != num_subcenters or num_subcenters < 1:
            raise ValueError(f"num_subcenters must be a positive integer, got {num_subcenters!r}")
        # K sub-centers per identity (sub-center ArcFace): identity c's rows are c*K .. c*K+K-1 of the shard.
        self.num_subcenters = int(num_subcenters)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.comm = comm if comm is not None else get_comm()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.margin = resolve_margin(margin)
        # An adaptive margin's running statistics: buffers, so they follow .to() / .double() and state_dict.
        for name, value in zip(self._state_names(), getattr(self.margin, "initial_state", ())):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        self.interclass_filtering_threshold = float(interclass_filtering_threshold or 0.0)
        self.class_start, self.num_local = partition_classes(num_classes, self.comm.rank, self.comm.size)
        self.num_sample = min(self.num_local, math.ceil(sample_rate * self.num_local))
        # use_ext: the compiled kernels when they are loaded for the device; False: the reference ops.
        self.use_ext = bool(use_ext)
        self.ops = ops.op_table("cpu", self.use_ext)  # follows the table's device, see _apply
        self.seed = int(seed)  # the optimizers derive their stochastic-rounding seed from it
        init = torch.Generator().manual_seed(seed + self.comm.rank)
        # Class centers are updated by SparseSGD only; autograd never sees them as a leaf.
        weight = self.ops.empty_table((self.num_local * self.num_subcenters, embedding_size),
                                      resolve_center_dtype(center_dtype))
        self.weight = nn.Parameter(fill_normal_(weight, 0.01, init), requires_grad=False)
        self.sampler = torch.Generator().manual_seed(seed * 7919 + self.comm.rank)
        self.center_grad = None  # CenterGrad of the current sample
        self.holding_sample = False  # see hold_sample()
        from .host_centers import HostCenters, resolve_center_device  # it builds on this module
        self.center_device = resolve_center_device(center_device)
        self.host_centers = HostCenters(self.ops, self.use_ext) if self.center_device else None
        # The logits' op table (the compute device's); the table's own, self.ops, gathers and updates.
        self.compute_ops = self.ops if self.host_centers is None else self.host_centers.compute_ops

    def _apply(self, fn, *args, **kwargs):
        if self.host_centers is not None:
            # The table stays on the host; the buffers and the logits' op table follow the module's device.
            self.host_centers.apply(self, fn, *args, **kwargs)
            self.compute_ops = self.host_centers.compute_ops
            return self
        # .to() / .cuda() / .double() move the table: the op table follows its device.
        super()._apply(fn, *args, **kwargs)
        if self.ops.device != self.weight.device:
            self.ops = self.compute_ops = ops.op_table(self.weight.device, self.use_ext)
        return self

    def _state_names(self):
        return getattr(self.margin, "state_names", ())

    def head_state(self):
        """The adaptive margin's running statistics ``{name: tensor}`` (copies; empty for a fixed margin),
        the same on every rank."""
        return {name: getattr(self, name).detach().clone() for name in self._state_names()}

    def load_head_state(self, state):
        """Restore what ``head_state()`` returned; a missing or unexpected key is a ValueError naming it."""
        names = set(self._state_names())
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise ValueError(f"head state for margin {self.margin!r}: missing keys {missing}, unexpected keys "
                             f"{unexpected}")
        for name in self._state_names():
            value = torch.as_tensor(state[name])
            buffer = getattr(self, name)
            if value.numel() != 1:
                raise ValueError(f"head state {name!r} must hold one value, got shape {list(value.shape)}")
            buffer.copy_(value.reshape(buffer.shape))

    @property
    def sampled_index(self):
        """``[S]`` local class ids of the current sample (None before the first); with K sub-centers, the
        ``[S*K]`` rows of the table they sampled (the identities are ``center_grad.identities``)."""
        return None if self.center_grad is None else self.center_grad.index

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"class_start={self.class_start}, num_local={self.num_local}, num_sample={self.num_sample}, "
                f"margin={self.margin}" + (f", num_subcenters={self.num_subcenters}" if self.num_subcenters > 1 else "")
                + (f", center_device={self.center_device!r}" if self.center_device else ""))

    def subcenter_rows(self, identities):
        """The table rows ``[S*K]`` of the local identities ``[S]``: all K sub-centers of each, in order (the
        identities themselves when K = 1)."""
        k = self.num_subcenters
        if k == 1:
            return identities
        return (identities[:, None] * k + torch.arange(k, device=identities.device)).flatten()

    def sample(self, labels):
        """``(index [S], target [B])`` for the global labels; see ``ops.sample_classes_ref``."""
        # The sample is taken where the table is (a host-resident table's on the host); the target goes with the labels.
        index, target = self.ops.sample_classes(labels.to(self.ops.device), self.class_start, self.num_local,
                                                self.num_sample, self.sampler)
        return index, target.to(labels.device)

    def hold_sample(self, local_labels_list):
        """Sample once for several micro-batches (a list of their local label tensors), and reuse that sample
        in each forward until ``hold_sample(None)``; the centers' gradients then add up in ``center_grad``,
        exactly as one forward over the concatenated batch would give them."""
        if local_labels_list is None:
            self.holding_sample = False
            return
        labels = torch.cat([self.comm.allgather(lab.long()) for lab in local_labels_list])
        identities = self.sample(labels)[0]
        if self.host_centers is not None:
            # The host thread gathers the rows now, while the caller runs the backbone's forward.
            self.center_grad = self.host_centers.center_grad(self.weight, self.subcenter_rows(identities),
                                                             identities, prefetch=True)
        else:
            self.center_grad = CenterGrad(self.subcenter_rows(identities), self.ops, identities)
        self.holding_sample = True

    def forward(self, local_embeddings, local_labels):
        labels = self._gather_labels(local_embeddings, local_labels)  # [B] global class ids
        compute = compute_dtype(local_embeddings, self.weight)  # the GEMMs' dtype
        if self.holding_sample:
            # Micro-batches of one optimizer step share the sample, so their center gradients add up.
            index = self.center_grad.identities
            target = ops.remap_labels(labels, self.class_start, self.num_local, index.to(labels.device))
        else:
            index, target = self.sample(labels)  # [S] sorted local ids, [B] in [0, S) or -1 (other rank)
            if self.host_centers is not None:
                self.center_grad = self.host_centers.center_grad(self.weight, self.subcenter_rows(index), index)
            else:
                # One backward, nothing to add up: a low-precision step writes the gradient over its centers.
                self.center_grad = CenterGrad(self.subcenter_rows(index), self.ops, index,
                                              reuse_centers=is_low_precision(self.weight.dtype)
                                              or is_low_precision(compute))
        embeddings = allgather_with_grad(local_embeddings, self.comm)  # [B, D]
        features = F.normalize(embeddings.to(accumulation_dtype(self.weight.dtype)), dim=1)
        features = features.to(compute)  # [B, D]
        margin, adaptive = self.margin, self._adaptive_args(embeddings)
        if adaptive is not None:
            margin = self.margin.scalars
        return MarginSoftmaxLoss.apply(features, self.center_grad.anchor, self.weight, target, self.center_grad,
                                       margin, self.interclass_filtering_threshold, self.comm, self.compute_ops,
                                       adaptive, self.num_subcenters)

    def _adaptive_args(self, embeddings):
        """The adaptive margin's arguments for this step (None for a fixed margin). The running statistics
        move in training mode only, as BatchNorm's do."""
        state = tuple(getattr(self, name) for name in self._state_names())
        if isinstance(self.margin, AdaFace):
            # The norms of the backbone's embeddings (before normalization), detached.
            norms = embeddings.detach().to(accumulation_dtype(self.weight.dtype)).norm(dim=1)
            angular, additive = self.margin.sample_margins(norms, state, self.training)
            return AdaptiveArgs(sample_m2=angular, sample_m3=additive, clip_eps=self.margin.eps)
        if isinstance(self.margin, CurricularFace):
            return AdaptiveArgs(curricular=self.margin, state=state, update=self.training)
        return None

    def _gather_labels(self, local_embeddings, local_labels):
        """The global labels [B], after checking shapes, equal batch sizes and the label range."""
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [batch, {self.embedding_size}], got {list(local_embeddings.shape)}")
        if local_labels.dim() != 1 or local_labels.shape[0] != local_embeddings.shape[0]:
            raise ValueError(f"labels must be [batch] = [{local_embeddings.shape[0]}], got {list(local_labels.shape)}")
        comm = self.comm
        # Every rank must hold the same batch size, or the gathered rows would not line up.
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
