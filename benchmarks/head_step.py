"""Benchmark of one Partial FC head step (forward + backward + class-center update).

    python benchmarks/head_step.py                       # CPU: D=512, B=128, r=0.1 at 100K and 1M classes
    python benchmarks/head_step.py --device cuda         # GPU: B=512 at 1M and 10M classes
    python benchmarks/head_step.py --device cuda --dtype bfloat16   # the step under bf16 autocast

--center-dtype bfloat16 / float16 stores the head's class-center table and its momentum in that dtype
(PartialFC(center_dtype=...), stochastic rounding in the update); the step still computes in --dtype. The dense
baseline then keeps its own float32 table, and the GEMM floor writes its third product over the sampled centers'
buffer, which it shares with the head's step, as the head's low-precision step writes the centers' gradient
over the gathered centers (docs/memory.md). The largest CPU run on a 24 GB machine, alone on it:

    python benchmarks/head_step.py --classes 8000000 --center-dtype bfloat16 --variants fused gemm

--dtype bfloat16 / float16 runs each variant's step as training runs it under amp_dtype: the embeddings are
made in that dtype (a backbone's output under autocast) and the forward runs under torch.autocast of that
dtype, so the head's GEMMs run in it (float16: CUDA only, with a fixed loss scale passed to the optimizer, as
a GradScaler would); the gemm floor computes its three products in it. float32 (the default) is no autocast.

For each class count it runs, each in its own subprocess (so that peak memory is measured per variant):
  (a) fused      PartialFC + SparseSGD on the compiled kernels of partialfc._C
  (b) reference  the same head on the pure-PyTorch reference ops (use_ext=False)
  (c) dense      arcface_torch's PartialFC_V2 algorithm, written here: torch.rand over every local class and a
                 top-k with the positives forced in, the sampled rows gathered by autograd indexing (so the
                 table gets a dense gradient), torch.optim.SGD with momentum over the whole table
  (d) gemm       the floor: the step's three GEMMs alone ([B,D]x[D,S], [B,S]x[S,D], [S,B]x[B,D]) into
                 preallocated outputs, in the fused path's layout (on CPU the logits are held class by class,
                 so the first product is computed as [S,D]x[D,B], which MKL runs faster)
and prints the median step time, the ratios (c)/(a) and (a)/(d) (of the medians, and the median of the ratios
of back-to-back steps), each variant's peak memory above what
it held before its first step (CPU: the growth of the process's peak RSS, from getrusage; GPU:
torch.cuda.max_memory_allocated) and its process's whole peak (CPU: peak RSS; GPU: max_memory_allocated),
and the bytes per identity of the head's table and momentum. Step times come from one process that runs one step of each variant in
turn (the variants share the class-center table there, to fit in memory), so that other jobs on a shared
machine slow every variant alike; peak memory comes from a separate short run of each variant alone,
whose own median ("alone") is printed too. In the shared process the dense baseline trains the head's
table, which the head allocates on huge pages; alone, it allocates its own table with torch.normal.
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("fused", "reference", "dense", "gemm")
# The fused step without one CPU mechanism of partialfc.ops.cpu each (--mechanisms): what each one buys.
MECHANISMS = {"fused_no_reuse": dict(reuse_buffers=False), "fused_no_thp": dict(huge_pages=False),
              "fused_row_major": dict(class_major=False)}
MARGIN = (64.0, 1.0, 0.5, 0.0)  # ArcFace
DTYPES = ("float32", "bfloat16", "float16")
# float16 training scales the loss (GradScaler) so that small gradients survive the float16 GEMMs; a fixed
# power of two does the same here, and the optimizers divide it out.
LOSS_SCALE = {"float16": 1024.0}


def _autocast(torch, device, dtype_name):
    """The forward's context: torch.autocast of the benchmark's dtype, or nothing for float32."""
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name), enabled=dtype_name != "float32")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _dense_v2_step_factory(torch, num_classes, dim, rate, device, table=None, dtype_name="float32"):
    """arcface_torch PartialFC_V2 (one rank): dense Parameter, rand + topk sampling, torch.optim.SGD; the
    forward under autocast of ``dtype_name``, as arcface_torch trains with fp16/bf16."""
    import torch.nn.functional as F

    if table is None:
        table = torch.normal(0, 0.01, (num_classes, dim), device=device)
    weight = torch.nn.Parameter(table.detach())
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    num_sample = int(rate * num_classes)
    s, m1, m2, m3 = MARGIN
    loss_scale = LOSS_SCALE.get(dtype_name, 1.0)

    def step(embeddings, labels):
        with _autocast(torch, device, dtype_name):
            loss = _dense_v2_loss(embeddings, labels)
        if loss_scale == 1.0:
            loss.backward()
        else:
            (loss * loss_scale).backward()
            weight.grad.div_(loss_scale)  # what GradScaler.unscale_ does
        opt.step()
        opt.zero_grad()

    def _dense_v2_loss(embeddings, labels):
        with torch.no_grad():
            positive = torch.unique(labels, sorted=True)
            perm = torch.rand(num_classes, device=device)
            perm[positive] = 2.0
            index = torch.topk(perm, k=max(num_sample, positive.numel()))[1]
            index = index.sort()[0]
            target = torch.searchsorted(index, labels)
        sub_weight = weight[index]  # autograd indexing: backward scatters into a dense [C, D] gradient
        logits = F.linear(F.normalize(embeddings), F.normalize(sub_weight)).clamp(-1, 1)
        rows = torch.arange(labels.numel(), device=device)
        target_logit = logits[rows, target]
        with torch.no_grad():
            theta = torch.acos(target_logit)
            angle = m1 * theta + m2
        final = torch.where(angle <= math.pi, torch.cos(m1 * torch.acos(target_logit) + m2) - m3,
                            target_logit - m3 - m2 * math.sin(m2))
        # Under autocast acos/cos may run in float32 while the logits are in the compute dtype.
        logits = logits.index_put((rows, target), final.to(logits.dtype)) * s
        return F.cross_entropy(logits, target)

    return step


def _build(torch, variant, args, device, shared=None):
    """A ``step(x, y)`` closure for one variant. ``shared`` (a dict) lets the variants of one process share
    the class-center table and its momentum, so that all of them fit in memory together."""
    classes, dim, batch, rate = args.classes, args.dim, args.batch, args.rate
    shared = {} if shared is None else shared
    loss_scale = LOSS_SCALE.get(args.dtype, 1.0)
    if variant in ("fused", "reference") or variant in MECHANISMS:
        # Only the head's public API here, so that --baseline-tree can run this variant on another checkout.
        from partialfc.head import PartialFC, SparseSGD

        # center_dtype only when asked for, so that a --baseline-tree head without the option still runs.
        extra = {} if args.center_dtype == "float32" else dict(center_dtype=args.center_dtype)
        pfc = PartialFC(dim, classes, sample_rate=rate, margin=MARGIN, use_ext=variant != "reference",
                        **extra).to(device)
        if variant != "reference" and "Reference" in type(getattr(pfc, "ops", None)).__name__:
            raise SystemExit(f"partialfc._C is not usable on {device}; build it first")
        if variant in MECHANISMS:
            from partialfc.ops.cpu import CpuCompiledOps

            pfc.ops = CpuCompiledOps(device, **MECHANISMS[variant])
        opt = SparseSGD(pfc, lr=0.1, momentum=0.9, weight_decay=5e-4)
        if variant == "fused_no_thp":
            # Its own table and momentum on small pages (the shared ones are on huge pages).
            pfc.weight = torch.nn.Parameter(torch.empty_like(pfc.weight).copy_(pfc.weight), requires_grad=False)
            opt.param_groups[0]["params"] = [pfc.weight]
            opt.momentum_buffer()
        elif "weight" in shared:
            pfc.weight = shared["weight"]
            opt.param_groups[0]["params"] = [pfc.weight]
            opt.state[pfc.weight]["momentum_buffer"] = shared["momentum"]
        shared.setdefault("weight", pfc.weight)
        shared.setdefault("momentum", opt.momentum_buffer())  # allocated up front, like the dense table
        shared.setdefault("ops", pfc.ops)  # the step's buffers, which the GEMM floor borrows (low precision)

        def step(x, y):
            with _autocast(torch, device, args.dtype):
                loss = pfc(x, y)
            if loss_scale == 1.0:
                # Unscaled: step() without grad_scale, which the head of a --baseline-tree checkout may lack.
                loss.backward()
                opt.step()
            else:
                (loss * loss_scale).backward()
                opt.step(grad_scale=loss_scale)
            opt.zero_grad()
        return step
    if variant == "dense":
        # arcface_torch trains a float32 table: with a low-precision head it keeps its own.
        table = shared.get("weight") if args.center_dtype == "float32" else None
        if table is not None and table.dtype != torch.float32:
            table = None
        return _dense_v2_step_factory(torch, classes, dim, rate, device, table, args.dtype)
    from partialfc.ops import op_table

    num_sample = int(rate * classes)
    # In the compute dtype, as the head's GEMMs run under autocast.
    compute = getattr(torch, args.dtype)
    low_precision = args.center_dtype != "float32"
    # A low-precision head writes the centers' gradient over the gathered centers: the floor does the same, in
    # the head's own buffers when it shares the process with the head (they could not both fit at 8M classes).
    # Alone (the memory run) it keeps its own buffers: repeated products over one buffer would overflow, while in
    # the shared process the head's step gathers the rows afresh between two floor steps.
    borrow = low_precision and shared.get("ops") is not None
    table = shared["ops"] if borrow else op_table(device)
    if borrow:
        centers = table.empty("centers", (num_sample, dim), compute)
    else:
        centers = torch.empty(num_sample, dim, device=device, dtype=compute)
    for start in range(0, num_sample, 1 << 16):  # in chunks: no [S, D] temporaries next to an 8M-class table
        rows = centers[start:start + (1 << 16)]
        rows.copy_(torch.nn.functional.normalize(torch.randn(rows.shape, device=device)))
    grad_x = torch.empty(batch, dim, device=device, dtype=compute)
    grad_centers = centers if borrow else torch.empty(num_sample, dim, device=device, dtype=compute)
    # [B, S] in the fused path's layout (on CPU the transpose of an [S, B] buffer), the products computed the
    # way the head computes them
    logits = table.empty_logits("logits", batch, num_sample, compute)

    def step(x, y):
        xd = x.detach()
        table.mm_into(xd, centers.t(), logits)
        torch.mm(logits, centers, out=grad_x)
        torch.mm(logits.t(), xd, out=grad_centers)
    return step


def _batches(torch, args, device):
    g = torch.Generator().manual_seed(1)
    dtype = getattr(torch, args.dtype)
    return [(torch.randn(args.batch, args.dim, generator=g).to(device=device, dtype=dtype).requires_grad_(),
             torch.randint(0, args.classes, (args.batch,), generator=g).to(device)) for _ in range(4)]


def _setup(args):
    """``(torch, device, batches, sync)`` of a worker process: threads and seed set, inputs made."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return torch, device, _batches(torch, args, device), sync


def _timed(step, batch, sync):
    """Seconds of one ``step(x, y)``, the device synchronized before and after."""
    x, y = batch
    x.grad = None
    sync()
    start = time.perf_counter()
    step(x, y)
    sync()
    return time.perf_counter() - start


def _worker(args):
    """Peak memory of one variant (alone in this process), and its own step times."""
    torch, device, batches, sync = _setup(args)
    step = _build(torch, args.variant, args, device)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for i in range(args.warmup + args.steps):
        seconds = _timed(step, batches[i % len(batches)], sync)
        if i >= args.warmup:
            times.append(seconds)
    whole = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()
    print(json.dumps(dict(variant=args.variant, classes=args.classes, alone_median_s=statistics.median(times),
                          peak_extra_bytes=max(whole - base, 0), peak_bytes=whole, threads=torch.get_num_threads())))


def _interleaved(args):
    """Step times of every variant, in one process, one step of each in turn: other jobs on a shared
    machine then slow every variant alike, and the ratios stay meaningful."""
    torch, device, batches, sync = _setup(args)
    shared = {}
    # The floor last: with a low-precision head it borrows the head's step buffers.
    steps = {v: _build(torch, v, args, device, shared) for v in sorted(args.variants, key=lambda v: v == "gemm")}
    # One step of each in this order: fused runs right after the GEMM floor and right before the dense
    # baseline, so that each ratio pairs steps taken seconds apart (see _paired).
    order = sorted(steps, key=lambda v: ("gemm", "fused", "dense", "reference", *MECHANISMS).index(v))
    steps = {v: steps[v] for v in order}
    times = {v: [] for v in order}
    for i in range(args.warmup + args.steps):
        for v, step in steps.items():
            seconds = _timed(step, batches[i % len(batches)], sync)
            if i >= args.warmup:
                times[v].append(seconds)
    whole = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()
    print(json.dumps(dict(median={v: statistics.median(t) for v, t in times.items()}, times=times,
                          peak_bytes=whole)))


def _paired(times, num, den):
    """Median over steps of num_i / den_i: the two steps of a pair ran back to back, so a change of the
    machine's load between pairs (other jobs) cancels out of each ratio."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _subprocess(args, mode, classes, steps, variants=None, tree=ROOT):
    """One worker process; ``tree`` is the checkout whose ``partialfc`` it imports."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--classes", str(classes),
           "--device", args.device, "--batch", str(args.batch), "--dim", str(args.dim), "--rate", str(args.rate),
           "--steps", str(steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--dtype", args.dtype,
           "--center-dtype", args.center_dtype, "--variants", *(variants or args.variants)]
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Same environment for every variant. On a machine shared with other jobs, OpenMP threads that spin at
    # barriers steal the core from a descheduled peer; passive waiting avoids that (an explicit
    # OMP_WAIT_POLICY wins). The head puts its table, momentum and workspace on transparent huge pages by
    # itself (partialfc.ops.cpu); --thp lets torch's CPU allocator do so for every large tensor of
    # every variant (the dense baseline's own table, gradient and momentum included).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} at {classes} classes failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare_trees(args, classes):
    """This tree's fused step against ``--baseline-tree``'s: ``--rounds`` worker processes of each, in turn
    (this, baseline, this, ...), so that a change of the machine's load hits both alike."""
    trees = {"this tree": ROOT, "baseline": os.path.abspath(args.baseline_tree)}
    times = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            times[name] += _subprocess(args, "interleaved", classes, args.steps, ["fused"], tree)["times"]["fused"]
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"  fused, this tree {medians['this tree'] * 1e3:.1f} ms, baseline tree {medians['baseline'] * 1e3:.1f} ms "
          f"({len(times['baseline'])} steps each): this / baseline = {medians['this tree'] / medians['baseline']:.3f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--classes", type=int, nargs="+", help="class counts (default: 100K 1M on CPU, 1M 10M on GPU)")
    parser.add_argument("--batch", type=int, help="global batch (default: 128 on CPU, 512 on GPU)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="autocast dtype of the embeddings and the head's compute (float16: CUDA only)")
    parser.add_argument("--center-dtype", default="float32", choices=DTYPES,
                        help="storage of the head's class centers and momentum (PartialFC center_dtype)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each variant's memory run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + tuple(MECHANISMS))
    parser.add_argument("--mechanisms", action="store_true",
                        help="CPU: also run the fused step without each mechanism of partialfc.ops.cpu")
    parser.add_argument("--baseline-tree", help="another checkout (its extension built): its fused step is "
                        "timed against this tree's in alternating processes, --rounds of each")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree for --baseline-tree")
    parser.add_argument("--thp", action="store_true",
                        help="THP_MEM_ALLOC_ENABLE=1 for every variant (CPU): huge pages for all large torch tensors")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=VARIANTS + tuple(MECHANISMS) + ("interleaved",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if args.dtype == "float16" and not gpu:
        parser.error("--dtype float16 needs --device cuda (float16 autocast on the CPU is not how training runs "
                     "there; use bfloat16)")
    args.batch = args.batch or (512 if gpu else 128)
    if args.worker:
        args.variant, args.classes = args.worker, args.classes[0]
        return _interleaved(args) if args.worker == "interleaved" else _worker(args)
    classes_list = args.classes or ([1_000_000, 10_000_000] if gpu else [100_000, 1_000_000])
    if args.mechanisms and not gpu:
        args.variants = list(dict.fromkeys(list(args.variants) + ["fused", *MECHANISMS]))

    print(f"head step: D={args.dim} B={args.batch} r={args.rate} device={args.device} dtype={args.dtype} "
          f"(median of {args.steps} steps after {args.warmup} warm-up steps; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, huge pages {'on' if args.thp else 'off'})")
    element = {"float32": 4, "bfloat16": 2, "float16": 2}[args.center_dtype]
    print(f"class centers {args.center_dtype}: {2 * element * args.dim} bytes per identity (table {element * args.dim} "
          f"+ SGD momentum {element * args.dim})")
    results = []
    for classes in classes_list:
        # Timing: all variants in one process, one step of each in turn (see _interleaved).
        interleaved = _subprocess(args, "interleaved", classes, args.steps)
        medians, times = interleaved["median"], interleaved["times"]
        # Memory: each variant alone in its own process (a few steps).
        row = {}
        for v in args.variants:
            row[v] = _subprocess(args, v, classes, args.memory_steps)
            row[v]["median_s"] = medians[v]
        for v in row:
            row[v]["times_s"] = times[v]
        results.extend(row.values())
        print(f"\n{classes:,} classes (S = {int(args.rate * classes):,} sampled)")
        print(f"  {'variant':<16} {'median ms':>10} {'alone ms':>9} {'peak extra MiB':>15} {'peak MiB':>9}")
        for v, r in row.items():
            print(f"  {v:<16} {r['median_s'] * 1e3:>10.1f} {r['alone_median_s'] * 1e3:>9.1f} "
                  f"{r['peak_extra_bytes'] / 2 ** 20:>15.0f} {r['peak_bytes'] / 2 ** 20:>9.0f}")
        print(f"  (peak: the whole process, {'max_memory_allocated' if gpu else 'peak RSS'}; the timing process "
              f"with all variants: {interleaved['peak_bytes'] / 2 ** 20:.0f} MiB)")
        # Ratio of the medians, and the median of the per-step ratios of back-to-back steps (paired).
        pairs = [("dense", "fused"), ("reference", "fused"), ("fused", "gemm")] + [(m, "fused") for m in MECHANISMS]
        for num, den in pairs:
            if num in row and den in row:
                print(f"  {num + ' / ' + den:<24} = {row[num]['median_s'] / row[den]['median_s']:.3f}x "
                      f"(paired {_paired(times, num, den):.3f}x)")
        if args.baseline_tree:
            _compare_trees(args, classes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, dtype=args.dtype, center_dtype=args.center_dtype, batch=args.batch,
                           dim=args.dim, rate=args.rate, results=results), f, indent=1)


if __name__ == "__main__":
    main()
