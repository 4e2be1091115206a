"""Feature distillation: the student's embedding follows a fixed teacher's.

The training loss with ``distill_weight = w`` is the convex combination

    loss = (1 - w) * margin_softmax_loss + w * distill_loss

where ``distill_loss`` compares L2-normalized embeddings of the same images, averaged over the global batch:
``"l2"`` is ``|s/|s| - t/|t||^2`` (which equals ``2 * (1 - cos)``), ``"cosine"`` is ``1 - cos(s, t)``. When the
teacher's embedding size differs from the student's, a linear map (no bias) projects the student's embedding
to the teacher's size first; it trains with the backbone and is used only for this loss.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DISTILL_LOSSES", "DistillLoss", "ProjectedStudent", "distill_distance"]

DISTILL_LOSSES = ("l2", "cosine")


def distill_distance(student, teacher, kind):
    """Per-sample distance ``[b]`` between the rows of ``student`` and ``teacher`` (same width), in float32."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    if kind == "l2":
        return (s - t).pow(2).sum(dim=1)
    if kind == "cosine":
        return 1.0 - (s * t).sum(dim=1)
    raise ValueError(f"distill_loss must be one of {', '.join(map(repr, DISTILL_LOSSES))}, got {kind!r}")


class ProjectedStudent(nn.Module):
    """The backbone and the projection of its embedding to the teacher's size, as one data-parallel module
    (so that the projection's gradients are summed over ranks with the backbone's). ``forward`` returns
    ``(embedding [b, D], projected [b, D_teacher])``."""

    def __init__(self, backbone, projection):
        super().__init__()
        self.backbone, self.projection = backbone, projection

    def forward(self, images):
        embeddings = self.backbone(images)
        with torch.autocast(embeddings.device.type, enabled=False):  # a small GEMM; float32 like the embedding
            return embeddings, self.projection(embeddings.float())


class DistillLoss:
    """``teacher`` (eval mode, no gradients) and the distance to its embeddings.

    ``local_loss(images, student_features)`` is this rank's share of the global-batch mean: the sum over its
    ``b`` samples divided by the global batch ``b * world_size``, so that summing the backbone gradients over
    ranks (as the data-parallel wrapper does) gives the gradient of the global mean.
    """

    def __init__(self, teacher, kind, world_size):
        if kind not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {', '.join(map(repr, DISTILL_LOSSES))}, got {kind!r}")
        self.teacher, self.kind, self.world_size = teacher.eval(), kind, world_size
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def teacher_embeddings(self, images):
        self.teacher.eval()  # whatever a caller did to it: BatchNorm statistics never move
        return self.teacher(images)

    def local_loss(self, images, student_features):
        target = self.teacher_embeddings(images)
        distance = distill_distance(student_features, target, self.kind)
        return distance.sum() / (distance.shape[0] * self.world_size)
