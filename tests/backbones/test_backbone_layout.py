"""State-dict layouts of the backbones against a written-down description of arcface_torch's modules.

The expected names and shapes are generated here from the published structure (not by instantiating the
project's models), so a renamed module or a changed shape breaks loading of arcface_torch checkpoints and
fails these tests.
"""
import pytest
import torch

from partialfc.backbones import get_model

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class Layout:
    def __init__(self):
        self.params = {}
        self.buffers = {}

    def conv(self, name, cout, cin, k, groups=1, bias=False):
        self.params[f"{name}.weight"] = (cout, cin // groups, k, k)
        if bias:
            self.params[f"{name}.bias"] = (cout,)

    def bn(self, name, c):
        self.params[f"{name}.weight"] = (c,)
        self.params[f"{name}.bias"] = (c,)
        self.buffers[f"{name}.running_mean"] = (c,)
        self.buffers[f"{name}.running_var"] = (c,)
        self.buffers[f"{name}.num_batches_tracked"] = ()

    def prelu(self, name, c):
        self.params[f"{name}.weight"] = (c,)

    def linear(self, name, cout, cin, bias=True):
        self.params[f"{name}.weight"] = (cout, cin)
        if bias:
            self.params[f"{name}.bias"] = (cout,)

    def layernorm(self, name, c):
        self.params[f"{name}.weight"] = (c,)
        self.params[f"{name}.bias"] = (c,)

    def all(self):
        return {**self.params, **self.buffers}

    def num_params(self):
        total = 0
        for shape in self.params.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


def iresnet_layout(depths, num_features):
    """arcface_torch IResNet: stem conv1/bn1/prelu; layer1..4 of IBasicBlocks (64, 128, 256, 512 channels,
    stride 2 at each stage start, so every first block has a 1x1 conv + BN downsample); bn2; fc from
    512*7*7; features BatchNorm1d."""
    lay = Layout()
    lay.conv("conv1", 64, 3, 3)
    lay.bn("bn1", 64)
    lay.prelu("prelu", 64)
    cin = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), depths), start=1):
        for j in range(n):
            p = f"layer{stage}.{j}"
            lay.bn(f"{p}.bn1", cin)
            lay.conv(f"{p}.conv1", planes, cin, 3)
            lay.bn(f"{p}.bn2", planes)
            lay.prelu(f"{p}.prelu", planes)
            lay.conv(f"{p}.conv2", planes, planes, 3)
            lay.bn(f"{p}.bn3", planes)
            if j == 0:
                lay.conv(f"{p}.downsample.0", planes, cin, 1)
                lay.bn(f"{p}.downsample.1", planes)
            cin = planes
    lay.bn("bn2", 512)
    lay.linear("fc", num_features, 512 * 7 * 7)
    lay.bn("features", num_features)
    return lay


def mbf_layout(num_features, blocks=(1, 4, 6, 2), scale=2):
    lay = Layout()

    def conv_block(p, cin, cout, k, groups=1):
        lay.conv(f"{p}.layers.0", cout, cin, k, groups)
        lay.bn(f"{p}.layers.1", cout)
        lay.prelu(f"{p}.layers.2", cout)

    def linear_block(p, cin, cout, k, groups=1):
        lay.conv(f"{p}.layers.0", cout, cin, k, groups)
        lay.bn(f"{p}.layers.1", cout)

    def depthwise(p, cin, cout, inner):
        conv_block(f"{p}.layers.0", cin, inner, 1)
        conv_block(f"{p}.layers.1", inner, inner, 3, groups=inner)
        linear_block(f"{p}.layers.2", inner, cout, 1)

    def residual(p, c, n, inner):
        for i in range(n):
            depthwise(f"{p}.layers.{i}", c, c, inner)

    c1, c2 = 64 * scale, 128 * scale
    conv_block("layers.0", 3, c1, 3)
    assert blocks[0] == 1
    conv_block("layers.1", c1, c1, 3, groups=64)
    depthwise("layers.2", c1, c1, 128)
    residual("layers.3", c1, blocks[1], 128)
    depthwise("layers.4", c1, c2, 256)
    residual("layers.5", c2, blocks[2], 256)
    depthwise("layers.6", c2, c2, 512)
    residual("layers.7", c2, blocks[3], 256)
    conv_block("conv_sep", c2, 512, 1)
    linear_block("features.layers.0", 512, 512, 7, groups=512)
    lay.linear("features.layers.2", num_features, 512, bias=False)
    lay.bn("features.layers.3", num_features)
    return lay


def vit_layout(num_features, dim, depth, tokens=144, patch=9):
    lay = Layout()
    lay.conv("patch_embed.proj", dim, 3, patch, bias=True)
    lay.params["pos_embed"] = (1, tokens, dim)
    for i in range(depth):
        p = f"blocks.{i}"
        lay.layernorm(f"{p}.norm1", dim)
        lay.linear(f"{p}.attn.qkv", 3 * dim, dim, bias=False)
        lay.linear(f"{p}.attn.proj", dim, dim)
        lay.layernorm(f"{p}.norm2", dim)
        lay.linear(f"{p}.mlp.fc1", 4 * dim, dim)
        lay.linear(f"{p}.mlp.fc2", dim, 4 * dim)
    lay.layernorm("norm", dim)
    lay.linear("feature.0", dim, dim * tokens, bias=False)
    lay.bn("feature.1", dim)
    lay.linear("feature.2", num_features, dim, bias=False)
    lay.bn("feature.3", num_features)
    lay.params["mask_token"] = (1, 1, dim)
    return lay


IRESNET_DEPTHS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
                  "r200": (6, 26, 60, 6)}
VIT_SHAPES = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _random_state(layout, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.all().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(int(torch.randint(0, 10_000, (), generator=g)))
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g)
    return state


@pytest.mark.parametrize("name", sorted(IRESNET_DEPTHS))
def test_iresnet_state_dict_matches_arcface_layout_and_loads_strict(name):
    layout = iresnet_layout(IRESNET_DEPTHS[name], 512)
    torch.manual_seed(0)
    model = get_model(name, num_features=512)
    assert _shapes(model) == layout.all()
    assert sum(p.numel() for p in model.parameters()) == layout.num_params()
    # A checkpoint with exactly the published names/shapes loads strictly and every value lands.
    state = _random_state(layout, seed=len(name))
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # arcface_torch keeps the embedding BatchNorm's scale fixed at 1 (not trained).
    assert model.features.weight.requires_grad is False


def test_iresnet_parameter_counts_from_description():
    # Independent anchor: arcface_torch's r50 with a 512-d embedding has about 43.6M parameters.
    counts = {n: iresnet_layout(d, 512).num_params() for n, d in IRESNET_DEPTHS.items()}
    assert abs(counts["r50"] - 43.6e6) / 43.6e6 < 0.002
    assert counts["r18"] < counts["r34"] < counts["r50"] < counts["r100"] < counts["r200"]
    # The fc layer (25088 x D + D) is the only part that depends on the embedding size.
    assert iresnet_layout(IRESNET_DEPTHS["r50"], 128).num_params() == counts["r50"] - (25088 + 2) * 384 - 384


def test_iresnet_strict_load_rejects_a_wrong_layout():
    model = get_model("r18", num_features=512)
    state = _random_state(iresnet_layout(IRESNET_DEPTHS["r18"], 512), seed=1)
    state["layer1.0.downsample.2.weight"] = torch.zeros(64)
    with pytest.raises(RuntimeError, match="downsample.2.weight"):
        model.load_state_dict(state, strict=True)
    state = _random_state(iresnet_layout(IRESNET_DEPTHS["r18"], 256), seed=1)
    with pytest.raises(RuntimeError, match="fc.weight"):
        model.load_state_dict(state, strict=True)


def test_mbf_state_dict_matches_arcface_layout():
    layout = mbf_layout(512)
    with torch.device("meta"):
        model = get_model("mbf", num_features=512)
    assert _shapes(model) == layout.all()
    assert sum(p.numel() for p in model.parameters()) == layout.num_params()


@pytest.mark.parametrize("name", sorted(VIT_SHAPES))
def test_vit_state_dict_matches_arcface_layout(name):
    dim, depth = VIT_SHAPES[name]
    layout = vit_layout(128, dim, depth)
    with torch.device("meta"):
        model = get_model(name, num_features=128)
    assert _shapes(model) == layout.all()
    assert sum(p.numel() for p in model.parameters()) == layout.num_params()
