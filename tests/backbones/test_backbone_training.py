"""One CPU training step per backbone, with and without gradient checkpointing, at real depths.

Both runs start from the same weights, use the same inputs and the same RNG seed (ViT's drop-path and token
masking stay on), keep BatchNorm in train mode and dropout at 0; gradients, updated weights and BatchNorm
running statistics must agree.
"""
import pytest
import torch
from torch import nn

from partialfc.backbones import get_model

ALL = ["r18", "r34", "r50", "r100", "r200", "mbf", "vit_t", "vit_s", "vit_b", "vit_l"]
HEAVY = {"r200", "vit_l"}
D = 64


def _pair(name, **kw):
    """(plain, checkpointed) models with identical state; the second is built on meta and given a copy."""
    torch.manual_seed(0)
    plain = get_model(name, num_features=D, dropout=0.0, checkpointing=False, **kw)
    with torch.device("meta"):
        ckpt = get_model(name, num_features=D, dropout=0.0, checkpointing=True, **kw)
    ckpt.load_state_dict({k: v.clone() for k, v in plain.state_dict().items()}, strict=True, assign=True)
    return plain, ckpt


def _step(model, images, target, seed=123):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    torch.manual_seed(seed)
    out = model(images)
    loss = nn.functional.mse_loss(out, target)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return out.detach(), loss.item(), grads


def _check_step(name, **kw):
    plain, ckpt = _pair(name, **kw)
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 112, 112, generator=g) * 2 - 1
    target = torch.randn(2, D, generator=g)
    out_a, loss_a, grads_a = _step(plain, images, target)
    out_b, loss_b, grads_b = _step(ckpt, images, target)
    assert out_a.shape == (2, D) and out_a.dtype == torch.float32
    assert torch.isfinite(out_a).all()
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-5)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert set(grads_a) == trainable
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
    # The optimizer step and BatchNorm running statistics agree too: the recomputation inside backward
    # must not update the running mean/variance a second time.
    state_a, state_b = plain.state_dict(), ckpt.state_dict()
    for k in state_a:
        torch.testing.assert_close(state_b[k], state_a[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
    moved = [n for n, p in plain.named_parameters() if n in grads_a and grads_a[n].abs().max() > 0]
    assert moved, "no parameter received a gradient"


@pytest.mark.parametrize("name", [n for n in ALL if n not in HEAVY])
def test_checkpointing_gives_identical_training_step(name):
    _check_step(name)


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_checkpointing_gives_identical_training_step_heavy(name):
    _check_step(name)


@pytest.mark.parametrize("name, stage_attr", [("r18", "layer2"), ("mbf", "layers"), ("vit_t", "blocks")])
def test_checkpointing_recomputes_stages_in_backward(name, stage_attr):
    """With checkpointing a stage runs twice per step (forward + recomputation); without, once."""
    for checkpointing, expected in ((False, 1), (True, 2)):
        torch.manual_seed(0)
        model = get_model(name, num_features=D, checkpointing=checkpointing).train()
        stage = getattr(model, stage_attr)
        stage = stage[3] if isinstance(stage, nn.ModuleList) else stage
        calls = []
        # A pre-hook: the recomputation stops early once it has rebuilt what backward needs, so a stage's
        # forward hook may not fire on the second run.
        stage.register_forward_pre_hook(lambda *a: calls.append(1))
        model(torch.randn(2, 3, 112, 112)).sum().backward()
        assert len(calls) == expected, (name, checkpointing)
        # Eval / no-grad forward never recomputes.
        calls.clear()
        with torch.no_grad():
            model(torch.randn(2, 3, 112, 112))
        assert len(calls) == 1


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_fp16_runs_body_in_low_precision_and_returns_float32(name):
    torch.manual_seed(0)
    ref = get_model(name, num_features=D).eval()
    half = get_model(name, num_features=D, fp16=True).eval()
    half.load_state_dict(ref.state_dict())
    dtypes = []
    # ViT keeps its residual stream in float32 (as arcface_torch); its linear layers run in low precision.
    probe = {"r18": "layer1", "mbf": "layers.1", "vit_t": "blocks.1.mlp.fc1"}[name]
    half.get_submodule(probe).register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        a, b = ref(x), half(x)
    assert dtypes == [torch.bfloat16]  # the CPU's autocast type
    assert b.dtype == torch.float32 and b.shape == (3, D)
    cos = nn.functional.cosine_similarity(a, b, dim=1)
    assert cos.min() > 0.98, cos


@pytest.mark.parametrize("fp16", [False, True])
def test_inside_a_callers_autocast_the_body_keeps_its_dtype_and_embeddings_are_float32(fp16):
    probes = {"r18": "layer1", "mbf": "layers.1", "vit_t": "blocks.1.mlp.fc1"}
    for name, probe in probes.items():
        model = get_model(name, num_features=D, fp16=fp16).eval()
        dtypes = []
        model.get_submodule(probe).register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            out = model(torch.rand(2, 3, 112, 112) * 2 - 1)
        assert dtypes == [torch.float16], name
        assert out.dtype == torch.float32, name


def test_fp16_with_checkpointing_matches_fp16_gradients():
    plain, ckpt = _pair("r18", fp16=True)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    target = torch.randn(2, D)
    _, la, ga = _step(plain, x, target)
    _, lb, gb = _step(ckpt, x, target)
    assert la == pytest.approx(lb, abs=1e-6)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-5)


def test_vit_training_masking_and_drop_path_follow_the_seed():
    torch.manual_seed(0)
    model = get_model("vit_t", num_features=D).train()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(5)
        a = model(x)
        torch.manual_seed(5)
        b = model(x)
        torch.manual_seed(6)
        c = model(x)
        model.eval()
        d1, d2 = model(x), model(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(d1, d2)
    no_mask = get_model("vit_t_dp005_mask0", num_features=D)
    assert no_mask.mask_ratio == 0.0 and model.mask_ratio == 0.1


def test_bad_arguments_are_reported():
    with pytest.raises(KeyError, match="r51"):
        get_model("r51")
    with pytest.raises(ValueError, match="dropout"):
        get_model("r18", dropout=1.5)
    with pytest.raises(ValueError, match="amp_dtype"):
        get_model("mbf", fp16=True, amp_dtype="float8")
    with pytest.raises(ValueError, match="mask_ratio"):
        get_model("vit_t", mask_ratio=1.0)
    vit = get_model("vit_t", num_features=D).eval()
    with pytest.raises(ValueError, match=r"112, 112"):
        vit(torch.zeros(1, 3, 96, 96))


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    for name in ("r18", "mbf", "vit_t"):
        model = get_model(name, num_features=D, dropout=0.4).eval()
        x = torch.rand(2, 3, 112, 112) * 2 - 1
        with torch.no_grad():
            e1, e2 = model(x), model(x)
            model.train()
            torch.manual_seed(1)
            t1 = model(x)
            torch.manual_seed(2)
            t2 = model(x)
        assert torch.equal(e1, e2), name
        assert not torch.allclose(t1, t2), name
