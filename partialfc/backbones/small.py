"""A small residual face backbone for CPU development and the embedded synthetic dataset.

Same shape of network as iresnet (IBasicBlock stages, then BN -> dropout -> FC -> BN embedding head), with
half-resolution input, a strided stem and narrow stages, so that a 2-core laptop trains it in minutes:
about 0.03 GFLOPs at 112x112.
"""
import torch
from torch import nn

from .registry import register_backbone


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class SmallFaceNet(nn.Module):
    def __init__(self, widths=(24, 48, 96), num_features=128, dropout=0.0, fp16=False, checkpointing=False):
        super().__init__()
        self.fp16, self.checkpointing = fp16, checkpointing
        # Faces are read at half resolution: 112 -> 56 by pooling, 28 after the stem, then each stage halves.
        self.stem = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        stages, inplanes = [], widths[0]
        for planes in widths[1:]:
            stages.append(BasicBlock(inplanes, planes, 2))
            inplanes = planes
        self.stages = nn.ModuleList(stages)
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # as iresnet: a fixed-scale embedding BN

    def forward(self, x):  # [N, 3, 112, 112] -> [N, num_features]
        device_type = x.device.type
        amp_dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
        with torch.autocast(device_type, dtype=amp_dtype, enabled=self.fp16):
            x = self.stem(x)
            for stage in self.stages:
                if self.checkpointing and self.training:
                    x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
                else:
                    x = stage(x)
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)


@register_backbone("small")
def small(num_features=128, dropout=0.0, fp16=False, checkpointing=False):
    return SmallFaceNet((24, 48, 96), num_features, dropout, fp16, checkpointing)
