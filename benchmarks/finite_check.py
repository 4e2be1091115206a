"""The trainer's finiteness check of the centers' gradient: the bound from the margin backward's grad_absmax
(``CenterGrad.is_finite``) against a pass over the [S, D] gradient (``all_finite``, the check before it), timed
in the same process on the same gradient.

    python benchmarks/finite_check.py                                   # CPU, 1M classes, B=128
    python benchmarks/finite_check.py --device cuda --classes 10000000 --batch 512 --dtype bfloat16
"""
import argparse
import statistics
import time

import torch

from partialfc.head import PartialFC
from partialfc.head.partial_fc import all_finite


def _median_ms(fn, sync, repeats):
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype of the step (float32: none)")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pfc = PartialFC(args.dim, args.classes, sample_rate=args.rate).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.dim, generator=g).to(device).requires_grad_()
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    dtype = getattr(torch, args.dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = pfc(x, y)
    loss.backward()
    grad = pfc.center_grad
    assert grad.is_finite() and all_finite(grad.normalized_grad)
    bounded = grad.bounded_below_overflow(grad.normalized_grad)
    bound_ms = _median_ms(grad.is_finite, sync, args.repeats)
    pass_ms = _median_ms(lambda: all_finite(grad.normalized_grad), sync, args.repeats)
    grad_bytes = grad.normalized_grad.numel() * grad.normalized_grad.element_size()
    print(f"finiteness check: {args.classes:,} classes (S = {pfc.num_sample:,}), B={args.batch}, D={args.dim}, "
          f"device={device.type}, dtype={args.dtype}; gradient {grad_bytes / 2 ** 20:.0f} MiB "
          f"{str(grad.normalized_grad.dtype).replace('torch.', '')}; median of {args.repeats}")
    label = "is_finite (the bound from grad_absmax)" if bounded else "is_finite (the bound failed: a pass)"
    print(f"  {label:42s} {bound_ms:9.3f} ms")
    print(f"  {'all_finite (a pass over the gradient)':42s} {pass_ms:9.3f} ms")
    print(f"  bound / pass = {bound_ms / pass_ms:.2e}x (the bound's [B, D] max|features| runs in the backward)")


if __name__ == "__main__":
    main()
