"""Step rate of the head with host-resident class centers (``center_device="cpu"``) against device-resident
ones, measured in one run.

    python benchmarks/host_centers.py --device cuda      # 10M classes, B=512, r=0.1, D=512, bf16 autocast
    python benchmarks/host_centers.py --device cpu --classes 200000

Each step is the trainer's order for the head: ``hold_sample`` with the step's labels (host-resident only: the
host thread starts gathering the sampled rows), a stand-in for the backbone's forward (``--backbone-ms``: a
chain of GEMMs on the compute device, calibrated to that many milliseconds, 0 for the head alone), the head's
forward and backward, the centers' optimizer step (SGD with momentum) and ``zero_grad``. The two heads hold
the same table and take their steps alternately in one process, so that other jobs on the machine slow both
alike; the median step time of each, the step rates and their ratio are printed for every stand-in length.
On CUDA it also measures the host link (pinned copies of one step's rows each way) and prints the step time
the link alone implies for the host-resident head (docs/kernels.md, "Host-resident centers").
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MARGIN = (64.0, 1.0, 0.5, 0.0)  # ArcFace


def _sync(torch, device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def backbone_stand_in(torch, device, milliseconds, sync):
    """A function that queues about ``milliseconds`` of GEMMs on ``device`` (nothing for 0): the backbone's
    forward, which the host-resident head's gather may overlap."""
    if milliseconds <= 0:
        return lambda: None
    n = 4096 if device.type == "cuda" else 384
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync()
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    sync()
    count = max(1, round(milliseconds / 1e3 / ((time.perf_counter() - start) / reps)))

    def run():
        for _ in range(count):
            torch.mm(a, b, out=out)
    return run


def build_heads(torch, args, device):
    """``{"device": (pfc, optimizer), "host": (pfc, optimizer)}`` over the same table."""
    from partialfc import PartialFC
    from partialfc.comm import Communicator
    from partialfc.head import SparseSGD

    heads = {}
    for name, center_device in (("device", ""), ("host", "cpu")):
        pfc = PartialFC(args.dim, args.classes, args.rate, MARGIN, comm=Communicator(), seed=5,
                        center_device=center_device)
        if heads:
            with torch.no_grad():
                pfc.weight.copy_(heads["device"][0].weight.cpu())
        pfc = pfc.to(device)
        optimizer = SparseSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
        optimizer.materialize_state()
        heads[name] = (pfc, optimizer)
    return heads


def head_step(torch, pfc, optimizer, embeddings, labels, backbone, autocast):
    """One step as the trainer runs it (see the module docstring)."""
    if pfc.host_centers is not None:
        pfc.hold_sample([labels])
    backbone()
    with autocast():
        loss = pfc(embeddings, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    pfc.hold_sample(None)


def link_bandwidth(torch, device, num_rows, dim, dtype, repeats=5):
    """``(host -> device, device -> host)`` GB/s of pinned copies: one step's rows [S, D] in ``dtype`` to the
    device, and their float32 gradient back."""
    rates = []
    for direction, elem in (("h2d", dtype), ("d2h", torch.float32)):
        host = torch.empty((num_rows, dim), dtype=elem, pin_memory=True)
        dev = torch.empty((num_rows, dim), dtype=elem, device=device)
        src, dst = (host, dev) if direction == "h2d" else (dev, host)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        rates.append(host.numel() * host.element_size() / statistics.median(times) / 1e9)
    return tuple(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classes", type=int, help="class count (default: 10M on CUDA, 200K on CPU)")
    parser.add_argument("--batch", type=int, help="global batch (default: 512 on CUDA, 128 on CPU)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="autocast dtype of the head's GEMMs (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backbone-ms", type=float, nargs="+",
                        help="lengths of the backbone stand-in, one measurement each (0: the head alone; default "
                             "0 and 100 on CUDA, 0 on CPU, where the stand-in would share the cores with the gather)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per head and stand-in length")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.classes = args.classes or (10_000_000 if cuda else 200_000)
    args.batch = args.batch or (512 if cuda else 128)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.backbone_ms = args.backbone_ms or ([0.0, 100.0] if cuda else [0.0])

    # Two threads run OpenMP regions here (the step's and the host thread's gather): a thread spinning at a
    # barrier would take a core from the other's team (benchmarks/head_step.py does the same).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = _sync(torch, device)
    dtype = getattr(torch, args.dtype)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=args.dtype != "float32")

    start = time.perf_counter()
    before = torch.cuda.memory_allocated(device) if cuda else 0
    heads = build_heads(torch, args, device)
    num_sample = heads["device"][0].num_sample
    print(f"{args.classes:,} classes (S = {num_sample:,} sampled), batch {args.batch}, D {args.dim}, "
          f"{args.dtype}, {device}, {torch.get_num_threads()} threads; heads built in "
          f"{time.perf_counter() - start:.1f} s")
    result = dict(classes=args.classes, num_sample=num_sample, batch=args.batch, dim=args.dim, dtype=args.dtype,
                  device=str(device), threads=torch.get_num_threads(), runs=[])
    if cuda:
        # Device memory that each head keeps between steps: the device-resident table and momentum, or none.
        host_pfc = heads["host"][0]
        device_bytes = sum(t.numel() * t.element_size() for t in (heads["device"][0].weight,
                                                                  heads["device"][1].momentum_buffer()))
        result["device_resident_table_gib"] = device_bytes / 2 ** 30
        print(f"  device memory: {(torch.cuda.memory_allocated(device) - before) / 2 ** 30:.1f} GiB for both heads; "
              f"the device-resident table and momentum {device_bytes / 2 ** 30:.1f} GiB, the host-resident "
              f"head's none ({host_pfc.weight.device})")

    gen = torch.Generator().manual_seed(0)
    for backbone_ms in args.backbone_ms:
        backbone = backbone_stand_in(torch, device, backbone_ms, sync)
        times = {"device": [], "host": []}
        for i in range(args.warmup + args.steps):
            labels = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
            x = torch.randn(args.batch, args.dim, generator=gen).to(device=device, dtype=dtype)
            order = ("device", "host") if i % 2 == 0 else ("host", "device")
            for name in order:
                pfc, optimizer = heads[name]
                embeddings = x.clone().requires_grad_()
                sync()
                t0 = time.perf_counter()
                head_step(torch, pfc, optimizer, embeddings, labels, backbone, autocast)
                sync()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        dev_ms, host_ms = (statistics.median(times[n]) * 1e3 for n in ("device", "host"))
        ratio = dev_ms / host_ms
        print(f"  backbone stand-in {backbone_ms:g} ms: device-resident {dev_ms:.2f} ms/step "
              f"({1e3 / dev_ms:.2f} steps/s), host-resident {host_ms:.2f} ms/step ({1e3 / host_ms:.2f} steps/s); "
              f"host / device step rate = {ratio:.3f}x")
        result["runs"].append(dict(backbone_ms=backbone_ms, device_ms=dev_ms, host_ms=host_ms, rate_ratio=ratio,
                                   device_times_ms=[t * 1e3 for t in times["device"]],
                                   host_times_ms=[t * 1e3 for t in times["host"]]))
    if cuda:
        del heads
        torch.cuda.empty_cache()
        h2d, d2h = link_bandwidth(torch, device, num_sample, args.dim, dtype)
        rows_bytes = num_sample * args.dim * dtype.itemsize
        grad_bytes = num_sample * args.dim * 4
        link_ms = (rows_bytes / h2d + grad_bytes / d2h) / 1e6
        result.update(link_h2d_gbs=h2d, link_d2h_gbs=d2h, link_ms=link_ms)
        print(f"  link: host -> device {h2d:.1f} GB/s, device -> host {d2h:.1f} GB/s (pinned); one step's rows "
              f"({rows_bytes / 1e9:.2f} GB) and gradient ({grad_bytes / 1e9:.2f} GB) take {link_ms:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
