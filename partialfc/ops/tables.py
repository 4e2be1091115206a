"""The op tables: the ops of one head step, for one device, on the compiled kernels or the references.

The head runs one code (``partialfc.head.partial_fc``) over a table; the tables differ only in what runs
underneath. Every table offers the same signatures, the ``_out`` and in-place forms of the compiled ops:

    sample_classes(labels, class_start, num_local, num_sample, generator) -> (index [S], target [B])
    gather_normalize_out(weight, index, out [S, D], inv_norm [S])
    gather_normalize_backward_out(grad_normalized, normalized, inv_norm, out)
    margin_softmax_forward(logits [B, S], target, s, m1, m2, m3, filter_threshold, store_logits=True)
                                                                                        (in place)
        -> (row_max, sum_exp, target_logit, target_cos), each [B]
    margin_softmax_backward(logits, target, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                            grad_scale, filter_threshold, grad_absmax=None, from_cosines=False)
                                                                                        (in place)
    margin_softmax_forward_adaptive(logits, target, s, m1, m2, m3, filter_threshold, sample_m2, sample_m3,
                                    clip_eps, hard_threshold, hard_t, store_logits=True)
                                                                                        (in place)
    margin_softmax_backward_adaptive(logits, target, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                     grad_scale, filter_threshold, sample_m2, sample_m3, clip_eps,
                                     hard_threshold, hard_t, grad_absmax=None, from_cosines=False)
                                                                                        (in place)
    subcenter_max(cosines [B, S*K], num_subcenters) -> (values [B, S], argmax [B, S])  (sub-centers, K > 1)
    subcenter_max_backward(grad [B, S], argmax, num_subcenters) -> [B, S*K]
    sparse_sgd_update(weight, momentum_buffer, index, grad_rows, lr, momentum, weight_decay)
    normalize_backward_sgd_update(weight, momentum_buffer, index, grad_normalized, inv_norm, lr, momentum,
                                  weight_decay, grad_scale)
    sparse_adamw_update(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, lr, beta1, beta2, eps,
                        weight_decay)
    normalize_backward_adamw_update(weight, exp_avg, exp_avg_sq, row_step, index, grad_normalized, inv_norm, lr,
                                    beta1, beta2, eps, weight_decay, grad_scale)

and the memory of the step: ``empty(name, shape, dtype)`` for a scratch tensor of this step,
``empty_logits(name, batch, num_sample, dtype)`` for a [B, S] logits tensor, ``empty_table(shape, dtype)``
for the class-center table and its optimizer state, and ``mm_into(a, b, out)``. ``reuses_buffers`` says
whether ``empty`` hands out the same memory step after step (then a backward must follow its own forward).
"""
import torch

from . import extension, reference

# The sub-center max's fake kernels and autograd (the other ops' are in extension.py). An extension built from
# older sources lacks the op; a head with num_subcenters > 1 then needs use_ext=False.
if extension.available() and hasattr(torch.ops.partialfc, "subcenter_max"):
    @torch.library.register_fake("partialfc::subcenter_max")
    def _subcenter_max_fake(cosines, num_subcenters):
        torch._check(num_subcenters >= 1 and cosines.shape[1] % num_subcenters == 0,
                     lambda: f"subcenter_max: {cosines.shape[1]} columns for num_subcenters = {num_subcenters}")
        shape = (cosines.shape[0], cosines.shape[1] // num_subcenters)
        return cosines.new_empty(shape), cosines.new_empty(shape, dtype=torch.long)

    @torch.library.register_fake("partialfc::subcenter_max_backward")
    def _subcenter_max_backward_fake(grad, argmax, num_subcenters):
        return grad.new_empty((grad.shape[0], grad.shape[1] * num_subcenters))

    # The gradient of the values goes to the argmax column; argmax is an index and has none.
    def _subcenter_max_setup(ctx, inputs, output):
        ctx.num_subcenters = inputs[1]
        ctx.save_for_backward(output[1])

    def _subcenter_max_backward(ctx, grad_values, grad_argmax):
        (argmax,) = ctx.saved_tensors
        return torch.ops.partialfc.subcenter_max_backward(grad_values, argmax, ctx.num_subcenters), None

    torch.library.register_autograd("partialfc::subcenter_max", _subcenter_max_backward,
                                    setup_context=_subcenter_max_setup)


class OpTable:
    """What every table shares: fresh tensors from the device's allocator."""

    reuses_buffers = False

    def __init__(self, device):
        self.device = torch.device(device)
        self.generation = 0  # forwards run on this table; a backward checks it when buffers are reused

    def empty(self, name, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    def empty_logits(self, name, batch, num_sample, dtype):
        return self.empty(name, (batch, num_sample), dtype)

    def empty_table(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    @property
    def margin_in_compute_dtype(self):
        """Whether the head's margin softmax runs in place on bfloat16 / float16 logits as the GEMM wrote them
        (float32 statistics, the gradient written back in that dtype), rather than on a float32 copy. On CUDA
        it does: the copy and the copy back are two full passes over the step's largest tensor. On CPU the
        float32 copy is kept: there the float32 kernels are vectorized and the half-precision ones are not."""
        return self.device.type == "cuda"

    # Whether the head's margin forward only reads the cosines (``store_logits=False``) and the backward derives
    # the logits from them (``from_cosines=True``): one write of the [B, S] logits less, where the compiled
    # CUDA kernels do it natively; the CPU kernels and the references would work on a copy.
    margin_reads_cosines = False

    @staticmethod
    def mm_into(a, b, out):
        """``out = a @ b``; ``out`` may be the transpose of a contiguous buffer, which the GEMM then fills as
        ``out^T = b^T @ a^T``."""
        if out.is_contiguous():
            return torch.mm(a, b, out=out)
        torch.mm(b.t(), a.t(), out=out.t())
        return out

    def __repr__(self):
        return f"{type(self).__name__}({self.device})"


class ReferenceOps(OpTable):
    """The pure-PyTorch references (``partialfc.ops.reference``): the semantics, on any device."""

    sample_classes = staticmethod(reference.sample_classes_ref)
    gather_normalize_out = staticmethod(reference.gather_normalize_out_ref)
    gather_normalize_backward_out = staticmethod(reference.gather_normalize_backward_out_ref)
    margin_softmax_forward = staticmethod(reference.margin_softmax_forward_ref)
    margin_softmax_backward = staticmethod(reference.margin_softmax_backward_ref)
    margin_softmax_forward_adaptive = staticmethod(reference.margin_softmax_forward_adaptive_ref)
    margin_softmax_backward_adaptive = staticmethod(reference.margin_softmax_backward_adaptive_ref)
    sparse_sgd_update = staticmethod(reference.sparse_sgd_update_ref)
    normalize_backward_sgd_update = staticmethod(reference.normalize_backward_sgd_update_ref)
    sparse_adamw_update = staticmethod(reference.sparse_adamw_update_ref)
    normalize_backward_adamw_update = staticmethod(reference.normalize_backward_adamw_update_ref)
    subcenter_max = staticmethod(reference.subcenter_max_ref)
    subcenter_max_backward = staticmethod(reference.subcenter_max_backward_ref)


def _stale_extension(what):
    """The error for an extension built from older sources than this package: ``what`` it lacks."""
    return RuntimeError(f"{what} (built from older sources): rebuild it with `python setup.py build_ext "
                        "--inplace`, or construct PartialFC(..., use_ext=False)")


def _has_argument(op_name, name):
    return any(a.name == name for a in getattr(torch.ops.partialfc, op_name).default._schema.arguments)


def _rounding_args(rounding_seed, rounding_step, class_start):
    """The update ops' trailing stochastic-rounding arguments; none without a seed (round to nearest), so an
    extension built before they existed still runs the float32 updates."""
    if rounding_seed is None:
        return ()
    if not _has_argument("sparse_sgd_update", "rounding_seed"):
        raise _stale_extension("partialfc._C has no stochastic rounding")
    return int(rounding_seed), int(rounding_step), int(class_start)


_SCHEMA_DEFAULTS = {"grad_absmax": None, "from_cosines": False, "store_logits": True}


def _newer_args(op_name, **args):
    """The margin ops' newer keyword arguments (``grad_absmax``, ``from_cosines``, ``store_logits``), passed
    only when they differ from their defaults, so that an extension built before they existed still runs the
    plain calls."""
    given = {name: value for name, value in args.items() if value is not _SCHEMA_DEFAULTS[name]}
    for name in given:
        if not _has_argument(op_name, name):
            raise _stale_extension(f"partialfc._C's {op_name} has no {name}")
    return given


def _require_op(name):
    if not hasattr(torch.ops.partialfc, name):
        raise _stale_extension(f"partialfc._C has no op {name}")


class CompiledOps(OpTable):
    """The kernels of ``partialfc._C`` (``torch.ops.partialfc``), on CPU or CUDA."""

    @property
    def margin_reads_cosines(self):
        return self.device.type == "cuda"

    @staticmethod
    def sample_classes(labels, class_start, num_local, num_sample, generator=None):
        # The kernel draws from its own seeded generator; the seed comes from the head's generator, so a
        # run is reproducible and resumable through that generator's state.
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator, device=device))
        return torch.ops.partialfc.sample_classes(labels, int(class_start), int(num_local), int(num_sample), seed)

    @staticmethod
    def gather_normalize_out(weight, index, out, inv_norm):
        torch.ops.partialfc.gather_normalize_out(weight, index, out, inv_norm)

    @staticmethod
    def gather_normalize_backward_out(grad_normalized, normalized, inv_norm, out):
        torch.ops.partialfc.gather_normalize_backward_out(grad_normalized.to(normalized.dtype), normalized,
                                                          inv_norm, out)

    @staticmethod
    def margin_softmax_forward(logits, target, s, m1, m2, m3, filter_threshold=0.0, store_logits=True):
        return torch.ops.partialfc.margin_softmax_forward(
            logits, target, float(s), float(m1), float(m2), float(m3), float(filter_threshold),
            **_newer_args("margin_softmax_forward", store_logits=bool(store_logits)))

    @staticmethod
    def margin_softmax_backward(logits, target, global_max, global_sum_exp, target_cos, s, m1, m2, m3, grad_scale,
                                filter_threshold=0.0, grad_absmax=None, from_cosines=False):
        torch.ops.partialfc.margin_softmax_backward(
            logits, target, global_max, global_sum_exp, target_cos, float(s), float(m1), float(m2), float(m3),
            float(grad_scale), float(filter_threshold),
            **_newer_args("margin_softmax_backward", grad_absmax=grad_absmax, from_cosines=bool(from_cosines)))
        return logits

    @staticmethod
    def margin_softmax_forward_adaptive(logits, target, s, m1, m2, m3, filter_threshold=0.0, sample_m2=None,
                                        sample_m3=None, clip_eps=0.0, hard_threshold=None, hard_t=0.0,
                                        store_logits=True):
        _require_op("margin_softmax_forward_adaptive")
        return torch.ops.partialfc.margin_softmax_forward_adaptive(
            logits, target, float(s), float(m1), float(m2), float(m3), float(filter_threshold), sample_m2, sample_m3,
            float(clip_eps), hard_threshold, float(hard_t),
            **_newer_args("margin_softmax_forward_adaptive", store_logits=bool(store_logits)))

    @staticmethod
    def margin_softmax_backward_adaptive(logits, target, global_max, global_sum_exp, target_cos, s, m1, m2, m3,
                                         grad_scale, filter_threshold=0.0, sample_m2=None, sample_m3=None,
                                         clip_eps=0.0, hard_threshold=None, hard_t=0.0, grad_absmax=None,
                                         from_cosines=False):
        _require_op("margin_softmax_backward_adaptive")
        torch.ops.partialfc.margin_softmax_backward_adaptive(
            logits, target, global_max, global_sum_exp, target_cos, float(s), float(m1), float(m2), float(m3),
            float(grad_scale), float(filter_threshold), sample_m2, sample_m3, float(clip_eps), hard_threshold,
            float(hard_t), **_newer_args("margin_softmax_backward_adaptive", grad_absmax=grad_absmax,
                                         from_cosines=bool(from_cosines)))
        return logits

    @staticmethod
    def subcenter_max(cosines, num_subcenters):
        _require_op("subcenter_max")
        return torch.ops.partialfc.subcenter_max(cosines, int(num_subcenters))

    @staticmethod
    def subcenter_max_backward(grad, argmax, num_subcenters):
        _require_op("subcenter_max_backward")
        return torch.ops.partialfc.subcenter_max_backward(grad, argmax, int(num_subcenters))

    @staticmethod
    def sparse_sgd_update(weight, momentum_buffer, index, grad_rows, lr, momentum, weight_decay, rounding_seed=None,
                          rounding_step=0, class_start=0):
        torch.ops.partialfc.sparse_sgd_update(weight, momentum_buffer, index, grad_rows, float(lr), float(momentum),
                                              float(weight_decay), *_rounding_args(rounding_seed, rounding_step,
                                                                                   class_start))

    def normalize_backward_sgd_update(self, weight, momentum_buffer, index, grad_normalized, inv_norm, lr, momentum,
                                      weight_decay, grad_scale=1.0, rounding_seed=None, rounding_step=0,
                                      class_start=0):
        # One fused kernel on CPU and CUDA.
        torch.ops.partialfc.normalize_backward_sgd_update(weight, momentum_buffer, index, grad_normalized, inv_norm,
                                                          float(lr), float(momentum), float(weight_decay),
                                                          float(grad_scale),
                                                          *_rounding_args(rounding_seed, rounding_step, class_start))

    @staticmethod
    def sparse_adamw_update(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, lr, beta1, beta2, eps,
                            weight_decay, rounding_seed=None, rounding_step=0, class_start=0):
        torch.ops.partialfc.sparse_adamw_update(weight, exp_avg, exp_avg_sq, row_step, index, grad_rows, float(lr),
                                                float(beta1), float(beta2), float(eps), float(weight_decay),
                                                *_rounding_args(rounding_seed, rounding_step, class_start))

    def normalize_backward_adamw_update(self, weight, exp_avg, exp_avg_sq, row_step, index, grad_normalized,
                                        inv_norm, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0,
                                        rounding_seed=None, rounding_step=0, class_start=0):
        # One fused kernel on CPU and CUDA.
        torch.ops.partialfc.normalize_backward_adamw_update(weight, exp_avg, exp_avg_sq, row_step, index,
                                                            grad_normalized, inv_norm, float(lr), float(beta1),
                                                            float(beta2), float(eps), float(weight_decay),
                                                            float(grad_scale),
                                                            *_rounding_args(rounding_seed, rounding_step,
                                                                            class_start))


def op_table(device, use_ext=True):
    """The table for tensors on ``device``: the compiled kernels when ``use_ext`` is true and the extension
    is loaded, not disabled (``PARTIALFC_DISABLE_EXT=1``) and built for the device; else the references.
    Each call gives a new table (a CPU table owns the buffers of one head)."""
    device = torch.device(device)
    if not (use_ext and extension.enabled() and extension.supports(device)):
        return ReferenceOps(device)
    if device.type == "cpu":
        from .cpu import CpuCompiledOps
        return CpuCompiledOps(device)
    return CompiledOps(device)
