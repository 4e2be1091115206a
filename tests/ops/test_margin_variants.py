"""AdaFace and CurricularFace: the head against dense float64 autograd references written out here, the
adaptive margin kernels against their references, opcheck, errors, the head's running state and the config."""
import math

import pytest
import torch
import torch.nn.functional as F

from partialfc import PartialFC
from partialfc.comm import Communicator
from partialfc.config import ConfigError, default_config, validate
from partialfc.head import AdaFace, CurricularFace, margin_from_config
from partialfc.ops import margin_softmax_backward_adaptive_ref, margin_softmax_forward_adaptive_ref

from ops_testutil import TOL, noncontiguous_like

ops = torch.ops.partialfc


# ---- the papers' losses, dense over all classes, by autograd ----

def dense_adaface_loss(x, w, y, state, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    """AdaFace as its authors' head computes it; ``state`` {"mean", "std"} is updated in place first."""
    norms = x.norm(dim=1).clip(0.001, 100).detach()
    with torch.no_grad():
        state["mean"] = norms.mean() * t_alpha + (1 - t_alpha) * state["mean"]
        state["std"] = norms.std() * t_alpha + (1 - t_alpha) * state["std"]
    ms = ((norms - state["mean"]) / (state["std"] + eps) * h).clip(-1, 1)
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1 + eps, 1 - eps)
    onehot = F.one_hot(y, w.shape[0]).to(x.dtype)
    theta = torch.clip(cos.acos() + onehot * (-m * ms)[:, None], min=eps, max=math.pi - eps)
    logits = theta.cos() - onehot * (m + m * ms)[:, None]
    return F.cross_entropy(s * logits, y)


def dense_curricular_loss(x, w, y, state, m=0.5, s=64.0, t_alpha=0.01):
    """CurricularFace as its authors' head computes it; ``state`` {"t"} is updated in place first."""
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1, 1)
    rows = torch.arange(y.shape[0])
    target = cos[rows, y][:, None]
    cos_m = target * math.cos(m) - torch.sqrt(1.0 - target ** 2) * math.sin(m)
    hard = (cos > cos_m).detach()
    final_target = torch.where(target > math.cos(math.pi - m), cos_m, target - math.sin(math.pi - m) * m)
    with torch.no_grad():
        state["t"] = target.mean() * t_alpha + (1 - t_alpha) * state["t"]
    logits = torch.where(hard, cos * (state["t"] + cos), cos)
    logits = logits.scatter(1, y[:, None], final_target)
    return F.cross_entropy(s * logits, y)


C, D, B = 37, 12, 16
START = {"adaface": {"mean": 3.0, "std": 0.6}, "curricularface": {"t": 0.3}}
HEAD_KEYS = {"adaface": ("adaface_batch_mean", "adaface_batch_std"), "curricularface": ("curricular_t",)}


def batch(step, weight):
    """Embeddings whose norms spread around the running mean (AdaFace's clip at both ends of ms), targets
    near their center (the angle clip), opposite it (CurricularFace's fallback) and anywhere."""
    g = torch.Generator().manual_seed(100 + step)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    unit = F.normalize(weight[y], dim=1)
    x[:4] = unit[:4] + 0.05 * x[:4]
    x[4:6] = -unit[4:6] + 0.05 * x[4:6]
    x = F.normalize(x, dim=1) * (0.5 + 5 * torch.rand(B, 1, generator=g, dtype=torch.float64))
    return x, y


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("margin", ["adaface", "curricularface"])
def test_head_equals_dense_reference_over_steps(margin, use_ext):
    torch.manual_seed(0)
    pfc = PartialFC(D, C, 1.0, margin, comm=Communicator(), use_ext=use_ext).double()
    pfc.weight.data = torch.randn(C, D, dtype=torch.float64)
    keys = HEAD_KEYS[margin]
    state = {k: torch.tensor(v, dtype=torch.float64) for k, v in START[margin].items()}
    pfc.load_head_state({key: state[k] for key, k in zip(keys, state)})
    dense = dense_adaface_loss if margin == "adaface" else dense_curricular_loss
    for step in range(4):
        x, y = batch(step, pfc.weight.detach())
        x = x.requires_grad_()
        loss = pfc(x, y)
        loss.backward()
        x_ref = x.detach().clone().requires_grad_()
        w_ref = pfc.weight.detach().clone().requires_grad_()
        ref = dense(x_ref, w_ref, y, state)
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), abs=1e-10), step
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)
        center = torch.zeros_like(w_ref)
        center[pfc.sampled_index] = pfc.center_grad.rows()
        torch.testing.assert_close(center, w_ref.grad, atol=1e-10, rtol=1e-8)
        head = pfc.head_state()
        for key, k in zip(keys, state):
            torch.testing.assert_close(head[key], state[k], atol=1e-12, rtol=1e-12)
        # a step of the centers, so that the next step's cosines come from moved centers
        with torch.no_grad():
            pfc.weight[pfc.sampled_index] -= 0.5 * pfc.center_grad.rows()


def test_the_margins_do_what_the_papers_say():
    """Pins the features of each margin that a fixed margin lacks: AdaFace's margin depends on the norm,
    CurricularFace's t re-weights the negatives (the dense references above would agree with a head that
    ignored them only if these were no-ops)."""
    w = torch.randn(C, D, dtype=torch.float64)
    x, y = batch(0, w)
    lows = dense_adaface_loss(x * 0.2, w, y, {"mean": torch.tensor(3.0), "std": torch.tensor(0.6)})
    highs = dense_adaface_loss(x * 5.0, w, y, {"mean": torch.tensor(3.0), "std": torch.tensor(0.6)})
    assert abs(lows.item() - highs.item()) > 1.0
    t0 = dense_curricular_loss(x, w, y, {"t": torch.tensor(0.0)})
    t1 = dense_curricular_loss(x, w, y, {"t": torch.tensor(50.0)})
    assert t1.item() > t0.item() + 1.0


def test_compiled_head_follows_reference_head_in_float32():
    torch.manual_seed(2)
    for margin in ("adaface", "curricularface"):
        heads = [PartialFC(D, C, 1.0, margin, comm=Communicator(), use_ext=ext) for ext in (True, False)]
        heads[1].weight.data.copy_(heads[0].weight.data)
        grads = []
        for pfc in heads:
            x, y = batch(1, pfc.weight.detach().double())
            x = x.float().requires_grad_()
            pfc(x, y).backward()
            grads.append((x.grad, pfc.center_grad.rows(), pfc.head_state()))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)
        for k in grads[0][2]:
            torch.testing.assert_close(grads[0][2][k], grads[1][2][k])


def test_eval_mode_keeps_the_running_statistics():
    pfc = PartialFC(D, C, 1.0, "adaface", comm=Communicator()).double()
    x, y = batch(0, pfc.weight.detach())
    pfc.eval()
    pfc(x, y)
    assert pfc.head_state() == {"adaface_batch_mean": torch.tensor(20.0, dtype=torch.float64),
                                "adaface_batch_std": torch.tensor(100.0, dtype=torch.float64)}
    pfc.train()
    pfc(x, y)
    assert pfc.head_state()["adaface_batch_mean"].item() != 20.0


def test_head_state():
    assert PartialFC(4, 10, comm=Communicator()).head_state() == {}
    pfc = PartialFC(4, 10, comm=Communicator(), margin="curricularface")
    assert set(pfc.head_state()) == {"curricular_t"} and "curricular_t" in pfc.state_dict()
    pfc.load_head_state({"curricular_t": torch.tensor([0.25])})
    assert pfc.curricular_t.item() == 0.25
    with pytest.raises(ValueError, match=r"missing keys \['curricular_t'\], unexpected keys \['t'\]"):
        pfc.load_head_state({"t": 0.1})
    with pytest.raises(ValueError, match=r"unexpected keys \['curricular_t'\]"):
        PartialFC(4, 10, comm=Communicator()).load_head_state({"curricular_t": 0.1})


def test_margin_from_config():
    config = default_config()
    assert margin_from_config(config) == (64.0, 1.0, 0.5, 0.0)
    config.update(margin_type="adaface", scale=32.0, adaface_h=0.5, margin_t_alpha=0.1)
    assert margin_from_config(config) == AdaFace(m=0.4, h=0.5, s=32.0, t_alpha=0.1)
    config.update(margin_type="curricularface", margin_m=0.45)
    assert margin_from_config(config) == CurricularFace(m=0.45, s=32.0, t_alpha=0.1)
    config.margin_type = "magface"
    with pytest.raises(ValueError, match="'magface'"):
        margin_from_config(config)
    with pytest.raises(ConfigError, match="margin_type"):
        validate(config)


# ---- the adaptive ops against their references ----

def make(batch_size, num_sample, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cosines = (torch.rand(batch_size, num_sample, generator=g, dtype=torch.float64) * 2 - 1) * 0.95
    labels = torch.randint(0, num_sample, (batch_size,), generator=g)
    labels[torch.rand(batch_size, generator=g) > 0.7] = -1
    cosines[0, labels[0].clamp_min(0)] = 0.9995  # on AdaFace's clamp
    cosines[1, 3] = -0.9999
    extra = dict(sample_m2=(torch.rand(batch_size, generator=g, dtype=torch.float64) - 0.5) * 0.8,
                 sample_m3=torch.rand(batch_size, generator=g, dtype=torch.float64) * 0.8,
                 hard_threshold=torch.rand(batch_size, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    return cosines.to(dtype), labels, extra


VARIANTS = {
    "adaface": dict(margin=(64.0, 1.0, 0.0, 0.0), clip_eps=1e-3, keys=("sample_m2", "sample_m3"), hard_t=0.0),
    "curricularface": dict(margin=(64.0, 1.0, 0.5, 0.0), clip_eps=0.0, keys=("hard_threshold",), hard_t=0.37),
    "all": dict(margin=(30.0, 1.1, 0.2, 0.1), clip_eps=0.01, keys=("sample_m2", "sample_m3", "hard_threshold"),
                hard_t=-0.2),
    "fallback": dict(margin=(16.0, 1.0, 2.5, 0.0), clip_eps=0.0, keys=("sample_m2",), hard_t=0.0),
}


def op_args(variant, extra, dtype):
    v = VARIANTS[variant]
    kw = {k: (extra[k].to(dtype) if k in v["keys"] else None) for k in ("sample_m2", "sample_m3", "hard_threshold")}
    return v["margin"], kw["sample_m2"], kw["sample_m3"], v["clip_eps"], kw["hard_threshold"], v["hard_t"]


def layout_of(t, layout):
    if layout == "strided":
        return noncontiguous_like(t)
    if layout == "class_major":
        return t.t().clone(memory_format=torch.contiguous_format).t()
    return t.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("threshold", [0.0, 0.5])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "class_major"])
def test_kernels_match_reference(dtype, variant, threshold, layout):
    cosines, labels, extra = make(24, 67, dtype)
    margin, sm2, sm3, eps, hard, hard_t = op_args(variant, extra, dtype)
    out = layout_of(cosines, layout)
    stats = ops.margin_softmax_forward_adaptive(out, labels, *margin, threshold, sm2, sm3, eps, hard, hard_t)
    ref = cosines.clone()
    ref_stats = margin_softmax_forward_adaptive_ref(ref, labels, *margin, threshold, sm2, sm3, eps, hard, hard_t)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol * margin[0], rtol=rtol)
    for name, a, b in zip(("row_max", "sum_exp", "target_logit", "target_cos"), stats, ref_stats):
        torch.testing.assert_close(a, b, atol=atol * margin[0], rtol=rtol * 4, msg=name)
    row_max, sum_exp, _, target_cos = ref_stats
    grad = layout_of(ref, layout)
    ops.margin_softmax_backward_adaptive(grad, labels, row_max, sum_exp, target_cos, *margin, 1 / 24, threshold, sm2,
                                         sm3, eps, hard, hard_t)
    ref_grad = margin_softmax_backward_adaptive_ref(ref.clone(), labels, row_max, sum_exp, target_cos, *margin,
                                                    1 / 24, threshold, sm2, sm3, eps, hard, hard_t)
    torch.testing.assert_close(grad, ref_grad, atol=atol * 10, rtol=rtol * 4)
    if variant == "adaface":
        # AdaFace's clamp: the cosine clamped at 1 - eps (a non-target one, or the target) gets no gradient
        assert grad[1, 3] == 0


class _AdaptiveLoss(torch.autograd.Function):
    """Mean loss from the two adaptive ops, so gradcheck compares the backward op with the forward op."""

    @staticmethod
    def forward(ctx, cosines, labels, args):
        logits = cosines.detach().clone()
        row_max, sum_exp, target_logit, target_cos = ops.margin_softmax_forward_adaptive(logits, labels, *args[0],
                                                                                         0.0, *args[1:])
        ctx.save_for_backward(logits, labels, row_max, sum_exp, target_cos)
        ctx.args = args
        return (row_max + torch.log(sum_exp) - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, row_max, sum_exp, target_cos = ctx.saved_tensors
        grad = logits.clone()
        margin, rest = ctx.args[0], ctx.args[1:]
        ops.margin_softmax_backward_adaptive(grad, labels, row_max, sum_exp, target_cos, *margin,
                                             float(grad_loss) / labels.numel(), 0.0, *rest)
        return grad, None, None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_float64(variant):
    g = torch.Generator().manual_seed(5)
    cosines = (torch.rand(6, 11, generator=g, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    labels = torch.tensor([0, 3, 10, 5, 7, 2])
    _, _, extra = make(6, 11, torch.float64, seed=5)
    margin, *rest = op_args(variant, extra, torch.float64)
    args = ((margin[0] / 16.0,) + margin[1:], *rest)
    assert torch.autograd.gradcheck(lambda c: _AdaptiveLoss.apply(c, labels, args), (cosines,))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_opcheck(variant):
    cosines, labels, extra = make(6, 10, torch.float32)
    margin, sm2, sm3, eps, hard, hard_t = op_args(variant, extra, torch.float32)
    torch.library.opcheck(ops.margin_softmax_forward_adaptive,
                          (cosines.clone(), labels, *margin, 0.0, sm2, sm3, eps, hard, hard_t))
    logits = cosines.clone()
    row_max, sum_exp, _, target_cos = margin_softmax_forward_adaptive_ref(logits, labels, *margin, 0.0, sm2, sm3, eps,
                                                                          hard, hard_t)
    torch.library.opcheck(ops.margin_softmax_backward_adaptive,
                          (logits, labels, row_max, sum_exp, target_cos, *margin, 0.125, 0.0, sm2, sm3, eps, hard,
                           hard_t))


def test_without_extras_the_adaptive_op_is_the_fixed_margin():
    cosines, labels, _ = make(12, 30, torch.float64)
    a, b = cosines.clone(), cosines.clone()
    for x, y in zip(ops.margin_softmax_forward(a, labels, 64.0, 1.0, 0.5, 0.0, 0.0),
                    ops.margin_softmax_forward_adaptive(b, labels, 64.0, 1.0, 0.5, 0.0, 0.0, None, None, 0.0, None,
                                                        0.0)):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bad_input_messages():
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    args = (64.0, 1.0, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"sample_m2 must be \[2\], got \[3\]"):
        ops.margin_softmax_forward_adaptive(logits, labels, *args, torch.zeros(3), None, 0.0, None, 0.0)
    with pytest.raises(RuntimeError, match="hard_threshold must be a floating tensor, got Long"):
        ops.margin_softmax_forward_adaptive(logits, labels, *args, None, None, 0.0, torch.zeros(2, dtype=torch.long),
                                            0.0)
    with pytest.raises(RuntimeError, match=r"clip_eps must be in \[0, 0.5\), got 0.7"):
        ops.margin_softmax_forward_adaptive(logits, labels, *args, None, None, 0.7, None, 0.0)
    with pytest.raises(RuntimeError, match="hard_t must be finite, got inf"):
        ops.margin_softmax_backward_adaptive(logits, labels, torch.zeros(2), torch.ones(2), torch.zeros(2), 64.0, 1.0,
                                             0.0, 0.0, 1.0, 0.0, None, None, 0.0, torch.zeros(2), math.inf)
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 3 is outside \[-1, 3\)"):
        ops.margin_softmax_forward_adaptive(logits, torch.tensor([0, 3]), *args, None, None, 0.0, None, 0.0)
