"""IResNet (r18, r34, r50, r100, r200): the "improved" pre-activation ResNet of ArcFace.

Parameter and buffer names and shapes follow arcface_torch's ``iresnet.py``, so its model-zoo
``backbone.pth`` files load here with ``load_state_dict(..., strict=True)`` and ``model.pt`` files written by
this project load in arcface_torch.

Structure for a 112x112 input (every BatchNorm has eps 1e-5, every convolution has no bias):

* stem: ``conv1`` 3x3 3->64 stride 1, ``bn1``, ``prelu`` (per channel)
* ``layer1`` .. ``layer4``: 64, 128, 256, 512 channels, each stage starts with stride 2 (112 -> 7).
  A block (``IBasicBlock``) computes ``bn1 -> conv1 (3x3) -> bn2 -> prelu -> conv2 (3x3, stride) -> bn3`` and
  adds the shortcut; the first block of a stage has ``downsample`` = 1x1 strided conv + BatchNorm.
* head: ``bn2`` (BatchNorm2d 512), flatten (512*7*7), ``dropout``, ``fc`` (Linear 25088 -> D, with bias),
  ``features`` (BatchNorm1d D whose weight is fixed to 1 and not trained).

This module also holds the two helpers every backbone here shares: the mixed-precision context of
``fp16=True`` and the gradient-checkpointed stage call of ``checkpointing=True``.
"""
import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .registry import register_backbone

IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


# ----------------------------------------------------------------------------------------------------------
# Helpers shared by the backbones of this package
# ----------------------------------------------------------------------------------------------------------
def resolve_amp_dtype(amp_dtype):
    """``None``, a ``torch.dtype`` or the strings "float16"/"bfloat16" -> a dtype or None."""
    if amp_dtype is None or isinstance(amp_dtype, torch.dtype):
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be float16 or bfloat16, got {amp_dtype}")
        return amp_dtype
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if amp_dtype not in names:
        raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16', got {amp_dtype!r}")
    return names[amp_dtype]


def autocast_enabled(device_type):
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type):
    """Context that runs its body in full precision even inside an enclosing autocast."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def body_autocast(enabled, device_type, amp_dtype=None):
    """Mixed-precision context for a backbone body.

    On CUDA the default is float16 (as arcface_torch's ``torch.cuda.amp.autocast``); on the CPU it is
    bfloat16, the type CPU autocast is made for. Inside an enclosing autocast its dtype is kept, and
    ``amp_dtype`` overrides both.
    """
    if not enabled:
        return contextlib.nullcontext()
    if amp_dtype is None and autocast_enabled(device_type):
        # Inside a caller's autocast (the trainer's), keep its low-precision type.
        amp_dtype = torch.get_autocast_dtype(device_type)
    if device_type == "cuda":
        dtype = amp_dtype or torch.float16
    elif device_type == "cpu":
        dtype = amp_dtype or torch.bfloat16
    else:
        dtype = amp_dtype or torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


class _KeepNormStats:
    """Restores the running statistics of every norm layer of ``module`` on exit.

    Gradient checkpointing runs a stage's forward twice (once more inside backward). BatchNorm in train mode
    would update its running mean/variance and ``num_batches_tracked`` on both runs; restoring them around the
    recomputation keeps a checkpointed model's buffers identical to those of the plain model.
    """

    def __init__(self, module):
        self.norms = [m for m in module.modules()
                      if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]

    def __enter__(self):
        self.saved = [(m.running_mean.clone() if m.running_mean is not None else None,
                       m.running_var.clone() if m.running_var is not None else None,
                       m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                      for m in self.norms]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, (mean, var, count) in zip(self.norms, self.saved):
                if mean is not None:
                    m.running_mean.copy_(mean)
                if var is not None:
                    m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)
        return False


def run_stage(stage, x, checkpointing):
    """``stage(x)``, recomputed in backward instead of storing its activations when ``checkpointing``.

    Checkpointing only applies when autograd records the call (training with grad enabled); RNG state is
    preserved, so dropout/drop-path masks of the recomputation equal those of the first pass.
    """
    if not (checkpointing and torch.is_grad_enabled()):
        return stage(x)
    calls = [0]

    def forward(inp):
        calls[0] += 1
        if calls[0] == 1:
            return stage(inp)
        with _KeepNormStats(stage):
            return stage(inp)

    return checkpoint(forward, x, use_reentrant=False)


# ----------------------------------------------------------------------------------------------------------
# IResNet
# ----------------------------------------------------------------------------------------------------------
def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers, num_features=512, dropout=0.0, fp16=False, checkpointing=False,
                 amp_dtype=None, zero_init_residual=False):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"IResNet needs four stage depths >= 1, got {layers!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.fp16 = bool(fp16)
        self.amp_dtype = resolve_amp_dtype(amp_dtype)
        self.checkpointing = bool(checkpointing)
        self.num_features = int(num_features)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=float(dropout), inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, self.num_features)
        self.features = nn.BatchNorm1d(self.num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes, blocks, stride=2):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        with body_autocast(self.fp16, x.device.type, self.amp_dtype):
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = run_stage(stage, x, self.checkpointing and self.training)
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        with autocast_off(x.device.type):  # the embedding head always runs in float32
            return self.features(self.fc(x.float()))


def _factory(name):
    layers = IRESNET_LAYERS[name]

    def build(num_features=512, dropout=0.0, fp16=False, checkpointing=False, **kwargs):
        return IResNet(layers, num_features=num_features, dropout=dropout, fp16=fp16,
                       checkpointing=checkpointing, **kwargs)

    build.__name__ = f"iresnet_{name}"
    build.__doc__ = f"IResNet {name} (stage depths {layers}); extra kwargs: amp_dtype, zero_init_residual."
    return register_backbone(name)(build)


for _name in IRESNET_LAYERS:
    _factory(_name)
