"""Count a backbone's GFLOPs at 112x112 and its parameters.

    python -m partialfc.tools.flops r50 vit_b
    python -m partialfc.tools.flops --all

The convention is the one behind arcface_torch's published figures (ptflops plus the attention products that
it reports as ``extra_gflops``): a convolution or linear layer counts its multiply-adds (one per weight
use), q k^T and attn v count their multiply-adds, and element-wise layers count per output element: one for
a bias, PReLU/ReLU-type activation or pooling, two for an affine BatchNorm/LayerNorm. One image, eval mode
(no ViT token masking). The model is built on the ``meta`` device, so counting costs no memory or compute.
"""
import argparse
import sys

import torch
from torch import nn

from partialfc.backbones import available_backbones, get_model

# Figures published in arcface_torch's model-zoo tables (GFLOPs at 112x112).
SEED_GFLOPS = {
    "r18": 2.6, "r50": 6.3, "r100": 12.1, "r200": 23.5, "mbf": 0.45,
    "vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4, "vit_l": 25.3,
}

_ACTIVATIONS = (nn.PReLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish,
                nn.Tanh)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)
# Leaf modules that do no arithmetic worth counting.
_FREE = (nn.Dropout, nn.Identity, nn.Flatten)


def _norm_is_affine(m):
    return bool(getattr(m, "affine", False) or getattr(m, "elementwise_affine", False))


def count_flops(model, input_size=(3, 112, 112), device="meta"):
    """Count ``model``'s arithmetic on one ``input_size`` image.

    Returns ``dict(macs=..., elementwise=..., flops=..., params=...)``; ``flops = macs + elementwise`` in the
    convention described in this module's docstring. Raises ``TypeError`` naming any leaf module with
    parameters that the counter has no rule for, so a new layer type is never silently counted as free.
    """
    macs = 0
    elementwise = 0
    unknown = set()

    def hook(module, inputs, output):
        nonlocal macs, elementwise
        if hasattr(module, "matmul_macs"):
            x = inputs[0]
            macs += module.matmul_macs(x.shape[0], x.shape[1])
        if next(module.children(), None) is not None:
            return
        n_out = output.numel()
        if isinstance(module, nn.Conv2d):
            k = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            macs += n_out * k
            if module.bias is not None:
                elementwise += n_out
        elif isinstance(module, nn.Linear):
            macs += n_out * module.in_features
            if module.bias is not None:
                elementwise += n_out
        elif isinstance(module, _NORMS):
            elementwise += n_out * (2 if _norm_is_affine(module) else 1)
        elif isinstance(module, _ACTIVATIONS + _POOLS):
            elementwise += n_out
        elif isinstance(module, _FREE) or not any(True for _ in module.parameters(recurse=False)):
            pass
        else:
            unknown.add(type(module).__name__)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(input_size), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if unknown:
        raise TypeError(f"no FLOPs rule for module type(s) with parameters: {', '.join(sorted(unknown))}")
    params = sum(p.numel() for p in model.parameters())
    return dict(macs=macs, elementwise=elementwise, flops=macs + elementwise, params=params)


def backbone_flops(name, num_features=512, input_size=(3, 112, 112)):
    """``count_flops`` of the registered backbone ``name``, built on the meta device."""
    with torch.device("meta"):
        model = get_model(name, num_features=num_features)
    return count_flops(model, input_size=input_size, device="meta")


def format_table(rows):
    header = f"{'network':<22}{'GFLOPs':>9}{'GMACs(conv/fc/attn)':>21}{'params(M)':>11}{'published':>11}{'diff':>8}"
    lines = [header, "-" * len(header)]
    for name, r in rows:
        seed = SEED_GFLOPS.get(name)
        g = r["flops"] / 1e9
        published = f"{seed:.2f}" if seed is not None else "-"
        diff = f"{100 * (g / seed - 1):+.1f}%" if seed is not None else "-"
        lines.append(f"{name:<22}{g:>9.3f}{r['macs'] / 1e9:>21.3f}{r['params'] / 1e6:>11.2f}{published:>11}"
                     f"{diff:>8}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m partialfc.tools.flops",
                                     description="GFLOPs at 112x112 and parameter counts of backbones.")
    parser.add_argument("names", nargs="*", help="backbone names (r50, mbf, vit_b, ...)")
    parser.add_argument("--all", action="store_true", help="every registered backbone")
    parser.add_argument("--embedding-size", type=int, default=512, help="num_features of the backbone")
    args = parser.parse_args(argv)
    names = available_backbones() if args.all else args.names
    if not names:
        parser.error("give backbone names or --all")
    unknown = [n for n in names if n not in available_backbones()]
    problem = None
    if unknown:
        problem = f"unknown backbone(s) {', '.join(unknown)}; available: {', '.join(available_backbones())}"
    elif args.embedding_size < 1:
        problem = f"--embedding-size must be a positive number of features, got {args.embedding_size}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    rows, failed = [], []
    for n in names:
        try:
            rows.append((n, backbone_flops(n, num_features=args.embedding_size)))
        except (TypeError, RuntimeError, NotImplementedError) as e:
            failed.append(f"{n}: {e}")
    print(format_table(rows))
    for line in failed:
        print(f"cannot count {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
