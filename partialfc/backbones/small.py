"""A small residual face backbone for CPU development and the embedded synthetic dataset.

The iresnet design at a laptop's scale: the same IBasicBlock stages and BN -> dropout -> FC -> BN embedding
head, on half-resolution input with a strided stem and narrow stages, so that a 2-core CPU trains it in
minutes: about 0.03 GFLOPs at 112x112.
"""
from torch import nn

from .iresnet import IBasicBlock, autocast_off, body_autocast, run_stage
from .registry import register_backbone


class SmallFaceNet(nn.Module):
    def __init__(self, widths=(24, 48, 96), num_features=128, dropout=0.0, fp16=False, checkpointing=False):
        super().__init__()
        self.fp16, self.checkpointing = fp16, checkpointing
        # Faces are read at half resolution: 112 -> 56 by pooling, 28 after the stem, then each stage halves.
        self.stem = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        stages, inplanes = [], widths[0]
        for planes in widths[1:]:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
            stages.append(IBasicBlock(inplanes, planes, 2, downsample))
            inplanes = planes
        self.stages = nn.ModuleList(stages)
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # as iresnet: a fixed-scale embedding BN

    def forward(self, x):  # [N, 3, 112, 112] -> [N, num_features]
        with body_autocast(self.fp16, x.device.type):
            x = self.stem(x)
            for stage in self.stages:
                x = run_stage(stage, x, self.checkpointing and self.training)
            x = self.dropout(self.bn2(x).flatten(1))
        with autocast_off(x.device.type):  # the embedding head always runs in float32
            return self.features(self.fc(x.float()))


@register_backbone("small")
def small(num_features=128, dropout=0.0, fp16=False, checkpointing=False):
    return SmallFaceNet((24, 48, 96), num_features, dropout, fp16, checkpointing)
