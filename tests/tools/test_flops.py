"""FLOPs counter: published arcface_torch figures, closed-form multiply-adds, and the CLI."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from partialfc.tools.flops import SEED_GFLOPS, backbone_flops, count_flops, main

# arcface_torch's model-zoo tables (GFLOPs at 112x112); mbf is "mobilefacenet-0.45G".
PUBLISHED = {"r18": 2.6, "r50": 6.3, "r100": 12.1, "r200": 23.5, "mbf": 0.45,
             "vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4, "vit_l": 25.3}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gflops_match_published_figures_within_5_percent(name):
    g = backbone_flops(name)["flops"] / 1e9
    assert abs(g / PUBLISHED[name] - 1) < 0.05, (name, g)
    assert SEED_GFLOPS[name] == PUBLISHED[name]


def test_r34_sits_between_r18_and_r50():
    r18, r34, r50 = (backbone_flops(n)["flops"] for n in ("r18", "r34", "r50"))
    assert r18 < r34 < r50


def _iresnet_macs(depths, d):
    """Multiply-adds of IResNet's convolutions and fc at 112x112, from the architecture description."""
    macs = 112 * 112 * 64 * 3 * 9  # stem conv, stride 1
    res, cin = 112, 64
    for planes, n in zip((64, 128, 256, 512), depths):
        out = res // 2
        macs += res * res * planes * cin * 9        # first block conv1 (stride 1, at input resolution)
        macs += out * out * planes * planes * 9     # first block conv2 (stride 2)
        macs += out * out * planes * cin            # 1x1 strided downsample
        macs += (n - 1) * 2 * out * out * planes * planes * 9
        res, cin = out, planes
    return macs + 512 * 7 * 7 * d


def _vit_macs(dim, depth, d, tokens=144, heads=8):
    per_block = tokens * dim * (3 * dim + dim + 4 * dim + 4 * dim)  # qkv, proj, fc1, fc2
    per_block += 2 * heads * tokens * tokens * (dim // heads)      # q k^T and attn v
    return tokens * dim * 3 * 81 + depth * per_block + tokens * dim * dim + dim * d


@pytest.mark.parametrize("name, depths", [("r18", (2, 2, 2, 2)), ("r34", (3, 4, 6, 3)), ("r50", (3, 4, 14, 3)),
                                          ("r100", (3, 13, 30, 3)), ("r200", (6, 26, 60, 6))])
def test_iresnet_macs_equal_closed_form(name, depths):
    assert backbone_flops(name, num_features=256)["macs"] == _iresnet_macs(depths, 256)


@pytest.mark.parametrize("name, dim, depth", [("vit_t", 256, 12), ("vit_s", 512, 12), ("vit_b", 512, 24),
                                              ("vit_l", 768, 24)])
def test_vit_macs_equal_closed_form_including_attention(name, dim, depth):
    assert backbone_flops(name)["macs"] == _vit_macs(dim, depth, 512)


def test_counter_rules_on_a_hand_counted_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),      # 112*112*8*27 MACs, +112*112*8 bias
        nn.BatchNorm2d(8),                              # 2 per element
        nn.PReLU(8),                                    # 1 per element
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # 56*56*8*9
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8 * 56 * 56, 10),                     # 25088*10 MACs + 10 bias
    )
    r = count_flops(model, device="cpu")
    e = 112 * 112 * 8
    assert r["macs"] == e * 27 + 56 * 56 * 8 * 9 + 25088 * 10
    assert r["elementwise"] == e + 2 * e + e + 10
    assert r["flops"] == r["macs"] + r["elementwise"]
    assert r["params"] == sum(p.numel() for p in model.parameters())
    assert model.training  # restored after counting in eval mode


def test_counter_refuses_unknown_parametrised_layers():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.w

    with pytest.raises(TypeError, match="Scale"):
        count_flops(nn.Sequential(nn.Conv2d(3, 4, 1), Scale()), device="cpu")


def test_cli_table_and_errors(capsys):
    assert main(["r50", "mbf"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"r50", "mbf"}
    assert float(rows["r50"][1]) == pytest.approx(backbone_flops("r50")["flops"] / 1e9, abs=1e-3)
    assert float(rows["r50"][3]) == pytest.approx(43.59, abs=0.01)  # params (M)
    assert rows["mbf"][4] == "0.45"
    with pytest.raises(SystemExit):
        main([])
    capsys.readouterr()
    # A wrong name or size is bad input, as in the other tools: one error line, exit status 1.
    assert main(["r51"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown backbone(s) r51; available: ") and "r50" in err and len(err.splitlines()) == 1
    assert main(["r50", "--embedding-size", "0"]) == 1
    assert capsys.readouterr().err == "error: --embedding-size must be a positive number of features, got 0\n"


def test_module_entry_point():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "partialfc.tools.flops", "vit_t"], capture_output=True, text=True,
                          timeout=120, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "vit_t" in proc.stdout and "1.50" in proc.stdout
