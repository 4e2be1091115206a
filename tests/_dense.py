"""An independent dense reference: the full margin softmax of one process over all classes, by autograd."""
import math

import torch
import torch.nn.functional as F


def dense_margin_loss(embeddings, weight, labels, s, m1, m2, m3, filter_threshold=0.0):
    """Mean cross-entropy of ``s * margin(cos)`` over all classes; differentiable w.r.t. both inputs."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()  # [B, C]
    rows = torch.arange(labels.shape[0])
    target = cos[rows, labels]
    theta = torch.acos(target.clamp(-1, 1))
    angle = m1 * theta + m2
    margin_target = torch.where(angle <= math.pi, torch.cos(angle) - m3, target - m3 - m2 * math.sin(m2))
    onehot = F.one_hot(labels, weight.shape[0]).bool()
    logits = cos
    if filter_threshold > 0:
        keep = ~((cos > filter_threshold) & ~onehot)
        logits = logits * keep.to(cos.dtype).detach()
    logits = torch.where(onehot, margin_target[:, None], logits)
    return F.cross_entropy(s * logits, labels)
