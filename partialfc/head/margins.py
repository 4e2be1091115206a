"""Margins. A fixed margin is ``(s, m1, m2, m3)``: logit = s * (cos(m1 * theta + m2) - m3) on the target.

The adaptive margins (``AdaFace``, ``CurricularFace``; definitions and decisions in docs/margins.md) change
with the batch: each keeps running statistics, which the head holds as buffers (``state_names``), and turns
them into the per-sample arguments of the adaptive margin-softmax ops.
"""
import math
from dataclasses import dataclass

import torch

PRESETS = {
    "arcface": (64.0, 1.0, 0.5, 0.0),
    "cosface": (64.0, 1.0, 0.0, 0.4),
    "sphereface": (64.0, 1.35, 0.0, 0.0),
    "combined": (64.0, 1.0, 0.3, 0.2),  # the MXNet partial_fc combined margin
    "softmax": (64.0, 1.0, 0.0, 0.0),   # normalized softmax, no margin
}


@dataclass(frozen=True)
class AdaFace:
    """AdaFace (Kim et al., CVPR 2022): the margin of sample ``b`` follows its feature norm ``n_b`` (clipped
    to [0.001, 100], detached). With running ``mean``, ``std`` of the norms (momentum ``t_alpha``, updated
    from the global batch before use) and ``ms = clip((n - mean) / (std + eps) * h, -1, 1)``, the target
    logit is ``s * (cos(clip(theta - m * ms, eps, pi - eps)) - (m + m * ms))``; every cosine is clamped to
    ``[-1 + eps, 1 - eps]``."""

    m: float = 0.4
    h: float = 0.333
    s: float = 64.0
    t_alpha: float = 0.01
    eps: float = 1e-3

    name = "adaface"
    state_names = ("adaface_batch_mean", "adaface_batch_std")
    initial_state = (20.0, 100.0)  # the reference implementation's initial mean and std

    @property
    def scalars(self):
        """``(s, m1, m2, m3)`` of the ops; the per-sample terms come from ``sample_margins``."""
        return (self.s, 1.0, 0.0, 0.0)

    @torch.no_grad()
    def sample_margins(self, norms, state, update):
        """``(angular [B], additive [B])`` margins from the global batch's feature norms; ``update`` first
        moves the running statistics ``state`` (the head's buffers, updated in place) to this batch."""
        mean, std = state
        safe = norms.detach().clamp(0.001, 100.0).to(mean.dtype)
        if update:
            mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * safe.mean())
            if safe.numel() > 1:  # the std of one sample is undefined: keep the running one
                std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * safe.std())
        ms = ((safe - mean) / (std + self.eps) * self.h).clamp(-1.0, 1.0)
        return -self.m * ms, self.m + self.m * ms


@dataclass(frozen=True)
class CurricularFace:
    """CurricularFace (Huang et al., CVPR 2020): the target logit is ArcFace's ``s * cos(theta + m)`` (with
    its fallback); a running ``t`` (0 at first, ``t = t_alpha * mean(target cos) + (1 - t_alpha) * t`` over
    the global batch, updated before use, no gradient) re-weights the hard negatives, those with
    ``cos_j > cos(theta + m)``, to ``s * cos_j * (t + cos_j)``."""

    m: float = 0.5
    s: float = 64.0
    t_alpha: float = 0.01

    name = "curricularface"
    state_names = ("curricular_t",)
    initial_state = (0.0,)

    @property
    def scalars(self):
        return (self.s, 1.0, self.m, 0.0)

    @torch.no_grad()
    def hard_threshold(self, target_cos, state, update):
        """``(threshold [B], t)``: ``cos(theta + m)`` of each sample's clamped target cosine, and the running
        ``t``, moved to this batch first when ``update``."""
        (t,) = state
        target_cos = target_cos.to(t.dtype)
        if update:
            t.mul_(1.0 - self.t_alpha).add_(self.t_alpha * target_cos.mean())
        sin = torch.sqrt((1.0 - target_cos * target_cos).clamp_min(0.0))
        return target_cos * math.cos(self.m) - sin * math.sin(self.m), float(t)


ADAPTIVE = {"adaface": AdaFace, "curricularface": CurricularFace}


def resolve_margin(margin):
    """``"arcface"``, ``(s, m1, m2, m3)``, ``"adaface"`` / ``"curricularface"`` or an ``AdaFace`` /
    ``CurricularFace`` -> a tuple of four floats or the adaptive margin."""
    if isinstance(margin, (AdaFace, CurricularFace)):
        return margin
    if isinstance(margin, str):
        if margin in ADAPTIVE:
            return ADAPTIVE[margin]()
        if margin not in PRESETS:
            raise ValueError(f"unknown margin preset {margin!r}; choose one of {', '.join([*PRESETS, *ADAPTIVE])}")
        return PRESETS[margin]
    values = tuple(float(v) for v in margin)
    if len(values) != 4:
        raise ValueError(f"margin must be (s, m1, m2, m3), got {margin!r}")
    if values[0] <= 0:
        raise ValueError(f"margin scale s must be positive, got {values[0]}")
    return values


def margin_from_config(config):
    """``margin_type`` "combined": arcface_torch's ``margin_list`` (m1, m2, m3) plus ``scale`` -> (s, m1, m2,
    m3); "adaface" / "curricularface": that margin with ``scale``, ``margin_m`` (None: the paper's m, 0.4
    and 0.5), ``margin_t_alpha`` and, for AdaFace, ``adaface_h``."""
    kind = getattr(config, "margin_type", "combined")
    if kind == "combined":
        m1, m2, m3 = config.margin_list
        return resolve_margin((config.scale, m1, m2, m3))
    if kind not in ADAPTIVE:
        raise ValueError(f"margin_type must be one of combined, {', '.join(ADAPTIVE)}; got {kind!r}")
    kw = dict(s=float(config.scale), t_alpha=float(getattr(config, "margin_t_alpha", 0.01)))
    if getattr(config, "margin_m", None) is not None:
        kw["m"] = float(config.margin_m)
    if kind == "adaface":
        kw["h"] = float(getattr(config, "adaface_h", 0.333))
    return ADAPTIVE[kind](**kw)
