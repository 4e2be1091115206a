"""MobileFaceNet (``mbf``, about 0.45 GFLOPs at 112x112, and ``mbf_large``).

Module names and shapes follow arcface_torch's ``mobilefacenet.py`` (itself derived from cavaface), so
state dicts move between the two unchanged. Structure with ``scale`` s (2 for ``mbf``, 4 for ``mbf_large``):

``layers`` (a ModuleList, the stages that ``checkpointing`` recomputes):

0. ConvBlock 3x3 stride 2, 3 -> 64s
1. blocks[0] == 1: depthwise-ish ConvBlock 3x3, 64s -> 64s, groups 64; otherwise a Residual of blocks[0]
   DepthWise units with 128 inner channels
2. DepthWise 64s -> 64s, stride 2, 128 inner channels
3. Residual(64s, blocks[1] units, 128 inner)
4. DepthWise 64s -> 128s, stride 2, 256 inner
5. Residual(128s, blocks[2] units, 256 inner)
6. DepthWise 128s -> 128s, stride 2, 512 inner
7. Residual(128s, blocks[3] units, 256 inner)

then ``conv_sep`` (ConvBlock 1x1 128s -> 512) and ``features`` (GDC: 7x7 depthwise LinearBlock, flatten,
Linear 512 -> D without bias, BatchNorm1d D). A ConvBlock is conv (no bias) + BatchNorm2d + PReLU, a
LinearBlock is conv + BatchNorm2d, a DepthWise unit is ConvBlock 1x1 -> grouped 3x3 ConvBlock ->
LinearBlock 1x1 (plus the input when residual).
"""
import torch
from torch import nn
from torch.nn import functional as F

from .iresnet import autocast_off, body_autocast, resolve_amp_dtype, run_stage
from .registry import register_backbone


class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1):
        super().__init__()
        if residual and (in_c != out_c or tuple(stride) != (1, 1)):
            raise ValueError("a residual DepthWise unit needs in_c == out_c and stride 1")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel=kernel, stride=stride, padding=padding, groups=groups),
            LinearBlock(groups, out_c),
        )

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, c, num_block, groups, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups)
                                      for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class FlattenDropout(nn.Module):
    """Flatten to [N, C]; then dropout with ``p`` (0 keeps arcface_torch's plain Flatten behaviour)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return F.dropout(x, self.p, self.training) if self.p > 0 else x


class GDC(nn.Module):
    """Global depthwise convolution head (7x7 depthwise conv instead of global pooling)."""

    def __init__(self, embedding_size, dropout=0.0):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=(7, 7), stride=(1, 1), padding=(0, 0), groups=512),
            FlattenDropout(dropout),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2, dropout=0.0, fp16=False,
                 checkpointing=False, amp_dtype=None):
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"MobileFaceNet needs four block counts >= 1, got {blocks!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.scale = int(scale)
        self.fp16 = bool(fp16)
        self.amp_dtype = resolve_amp_dtype(amp_dtype)
        self.checkpointing = bool(checkpointing)
        self.num_features = int(num_features)
        c1, c2 = 64 * self.scale, 128 * self.scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, num_block=blocks[0], groups=128))
        self.layers.extend([
            DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            Residual(c1, num_block=blocks[1], groups=128),
            DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            Residual(c2, num_block=blocks[2], groups=256),
            DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            Residual(c2, num_block=blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(self.num_features, dropout=dropout)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        with body_autocast(self.fp16, x.device.type, self.amp_dtype):
            for stage in self.layers:
                x = run_stage(stage, x, self.checkpointing and self.training)
        with autocast_off(x.device.type):  # conv_sep and the embedding head always run in float32
            return self.features(self.conv_sep(x.float()))


@register_backbone("mbf")
def mbf(num_features=512, dropout=0.0, fp16=False, checkpointing=False, **kwargs):
    """MobileFaceNet, blocks (1, 4, 6, 2), scale 2 (arcface_torch ``get_mbf``); extra kwargs: amp_dtype."""
    kwargs.setdefault("blocks", (1, 4, 6, 2))
    kwargs.setdefault("scale", 2)
    return MobileFaceNet(num_features=num_features, dropout=dropout, fp16=fp16, checkpointing=checkpointing,
                         **kwargs)


@register_backbone("mbf_large")
def mbf_large(num_features=512, dropout=0.0, fp16=False, checkpointing=False, **kwargs):
    """MobileFaceNet, blocks (2, 8, 12, 4), scale 4 (arcface_torch ``get_mbf_large``)."""
    kwargs.setdefault("blocks", (2, 8, 12, 4))
    kwargs.setdefault("scale", 4)
    return MobileFaceNet(num_features=num_features, dropout=dropout, fp16=fp16, checkpointing=checkpointing,
                         **kwargs)
