"""Margin presets. A margin is ``(s, m1, m2, m3)``: logit = s * (cos(m1 * theta + m2) - m3) on the target."""

PRESETS = {
    "arcface": (64.0, 1.0, 0.5, 0.0),
    "cosface": (64.0, 1.0, 0.0, 0.4),
    "sphereface": (64.0, 1.35, 0.0, 0.0),
    "combined": (64.0, 1.0, 0.3, 0.2),  # the MXNet partial_fc combined margin
    "softmax": (64.0, 1.0, 0.0, 0.0),   # normalized softmax, no margin
}


def resolve_margin(margin):
    """``"arcface"`` or ``(s, m1, m2, m3)`` -> a tuple of four floats."""
    if isinstance(margin, str):
        if margin not in PRESETS:
            raise ValueError(f"unknown margin preset {margin!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[margin]
    values = tuple(float(v) for v in margin)
    if len(values) != 4:
        raise ValueError(f"margin must be (s, m1, m2, m3), got {margin!r}")
    if values[0] <= 0:
        raise ValueError(f"margin scale s must be positive, got {values[0]}")
    return values


def margin_from_config(config):
    """arcface_torch's ``margin_list`` (m1, m2, m3) plus ``scale`` -> (s, m1, m2, m3)."""
    m1, m2, m3 = config.margin_list
    return resolve_margin((config.scale, m1, m2, m3))
