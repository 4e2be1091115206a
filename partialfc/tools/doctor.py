"""Check a launch before a long job: ranks, devices, network, the compiled kernels, collectives and data.

    python -m partialfc.tools.doctor [CONFIG] [key=value ...]
    torchrun --nproc_per_node=8 -m partialfc.tools.doctor configs/ms1mv3_r50.py
    horovodrun -np 16 -H host1:8,host2:8 python -m partialfc.tools.doctor configs/ms1mv3_r50.py

Launched like training, it prints each rank's host, device, communicator backend and network interface;
checks that ``partialfc._C`` is loaded and runs on the device (for a GPU, that its architecture is among
torch's build targets and the extension's recorded ``TORCH_CUDA_ARCH_LIST``); runs allgather, reduce_scatter and allreduce with known values and reports their
correctness and bandwidth; and, with a config, reads a batch of the training data (``rec``) on every rank
and loads each verification ``.bin`` on rank 0. It ends with ``doctor: OK`` (exit status 0) or ``doctor: N
problem(s)`` with advice for each (exit status 1).
"""
import argparse
import fcntl
import json
import os
import socket
import struct
import sys
import time

import torch

IFACE_VARS = ("HOROVOD_GLOO_IFACE", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
COLLECTIVE_BYTES = {"cpu": 4 << 20, "cuda": 64 << 20}


def network_interface(env=None):
    """``(interface, where it comes from)``: the first of HOROVOD_GLOO_IFACE, NCCL_SOCKET_IFNAME,
    GLOO_SOCKET_IFNAME that is set, else the interface that reaches MASTER_ADDR, else "default"."""
    env = os.environ if env is None else env
    for var in IFACE_VARS:
        if env.get(var):
            return env[var], var
    if env.get("MASTER_ADDR"):
        name = _interface_towards(env["MASTER_ADDR"])
        if name:
            return name, f"MASTER_ADDR={env['MASTER_ADDR']}"
    return "default", "none set: the backend picks one"


def _interface_towards(host):
    try:
        ip = socket.gethostbyname(host)
        if ip.startswith("127."):
            return "lo"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((ip, 9))  # no packet is sent: this only asks the routing table
            local = sock.getsockname()[0]
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            if socket.inet_ntoa(packed[20:24]) == local:
                return name
        except OSError:
            continue
    return None


class Report:
    """This rank's lines and problems (each a what and an advice)."""

    def __init__(self, rank):
        self.rank, self.lines, self.problems = rank, [], []

    def line(self, text):
        self.lines.append(text)

    def problem(self, what, advice):
        self.problems.append((what, advice))
        self.lines.append(f"PROBLEM: {what}")


def check_extension(report, device):
    from partialfc.ops import extension
    if extension.disabled_by_env():
        report.problem("PARTIALFC_DISABLE_EXT is set: training would run on the slower pure-PyTorch reference ops",
                       "unset PARTIALFC_DISABLE_EXT in the launch environment")
        return
    if not extension.available():
        report.problem(f"the compiled kernels partialfc._C are not loaded ({extension.LOAD_ERROR})",
                       "build them: `python setup.py build_ext --inplace` (or setup-utils/install.sh), with the "
                       "same torch as at run time")
        return
    if device.type == "cuda":
        if not extension.with_cuda():
            report.problem("partialfc._C was built without CUDA kernels",
                           "rebuild on a machine with the CUDA toolkit (nvcc) so the CUDA kernels are compiled")
            return
        from partialfc.ops.cuda_archs import built_arch_list, covers
        major, minor = torch.cuda.get_device_capability(device)
        name, arch, archs = torch.cuda.get_device_name(device), f"sm_{major}{minor}", torch.cuda.get_arch_list()
        ptx = [a for a in archs if a.startswith("compute_") and int(a[8:]) <= major * 10 + minor]
        if arch not in archs and not ptx:
            report.problem(f"{name} is {arch}, not among torch's build targets {archs}",
                           "install a torch build for this GPU, then rebuild partialfc._C")
        built = built_arch_list()
        if built is not None and not covers((major, minor), built):
            report.problem(f"partialfc._C was built for CUDA architectures {built!r}, which cannot run on {name} "
                           f"({major}.{minor}): training would fall back to the reference ops",
                           f'rebuild: TORCH_CUDA_ARCH_LIST="{major}.{minor}" python setup.py build_ext --inplace')
            return
        report.line(f"cuda {torch.version.cuda}, {name} ({arch}); torch built for {' '.join(archs)}; "
                    f"partialfc._C for {built if built is not None else 'unrecorded architectures'}")
    # A kernel call on the device: a missing architecture or a broken build fails here.
    try:
        weight = torch.randn(8, 4, device=device)
        index = torch.tensor([1, 5], device=device)
        normalized, _ = torch.ops.partialfc.gather_normalize(weight, index, torch.float32)
        expected = torch.nn.functional.normalize(weight[index], dim=1)
        if not torch.allclose(normalized, expected, atol=1e-5):
            report.problem(f"partialfc._C's gather_normalize gives wrong values on {device}",
                           "rebuild partialfc._C with the torch in use")
            return
    except Exception as exc:  # no kernel image for this architecture, an ABI mismatch
        report.problem(f"partialfc._C cannot run on {device} ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                       "rebuild partialfc._C for this device and the torch in use")
        return
    report.line(f"extension: partialfc._C loaded{' with CUDA kernels' if extension.with_cuda() else ''}, "
                f"runs on {device}")


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats=3):
    fn()  # warm-up (and the result checked)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / repeats


def check_collectives(report, comm, device):
    """allgather, reduce_scatter and allreduce (sum, max) of known values; bus bandwidth as nccl-tests count
    it (bytes moved per rank: allreduce 2(W-1)/W of the buffer, the others (W-1)/W of the whole)."""
    size, rank = comm.size, comm.rank
    count = COLLECTIVE_BYTES.get(device.type, 4 << 20) // 4 // size * size
    block = count // size
    rows = torch.arange(size, device=device, dtype=torch.float32)[:, None] + 1  # [W, 1]: 1..W
    cases = {
        "allgather": (lambda: comm.allgather(torch.full((block,), rank + 1.0, device=device)),
                      rows.expand(size, block).reshape(-1), count * 4 * (size - 1) / size),
        "reduce_scatter": (lambda: comm.reduce_scatter((rank + 1.0) * rows.expand(size, block).reshape(-1)),
                           torch.full((block,), (rank + 1.0) * size * (size + 1) / 2, device=device),
                           count * 4 * (size - 1) / size),
        "allreduce": (lambda: comm.allreduce(torch.full((count,), rank + 1.0, device=device), "sum"),
                      torch.full((count,), size * (size + 1) / 2, device=device), count * 4 * 2 * (size - 1) / size),
        "allreduce max": (lambda: comm.allreduce(torch.full((count,), rank + 1.0, device=device), "max"),
                          torch.full((count,), float(size), device=device), count * 4 * 2 * (size - 1) / size),
    }
    for name, (run, expected, moved) in cases.items():
        try:
            out = run()
            ok = tuple(out.shape) == tuple(expected.shape) and bool(torch.equal(out, expected))
            seconds = _timed(run, device)
        except Exception as exc:
            report.problem(f"{name} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                           "check that every rank reaches the others on the interface shown (set "
                           "NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME / HOROVOD_GLOO_IFACE), and the firewall")
            continue
        if not ok:
            report.problem(f"{name} of {count * 4 >> 20} MiB returned wrong values",
                           "the communicator is broken on this rank: check the backend's installation (NCCL, "
                           "Gloo, MPI) and that all ranks run the same torch and horovod")
            continue
        report.line(f"{name}: correct, {count * 4 / 2**20:.0f} MiB in {seconds * 1e3:.2f} ms"
                    + (f", bus bandwidth {moved / seconds / 1e9:.2f} GB/s" if size > 1 else " (one rank)"))


def check_data(report, config, comm):
    """Every rank reads one batch of its training data; rank 0 loads every verification set."""
    from partialfc.config import Config
    from partialfc.data import val_bin_path
    from partialfc.train import train_loader
    try:
        loader = train_loader(Config(config, num_workers=0), comm)
        images, labels = next(iter(loader))
        report.line(f"data: rec={config.rec!r} gives {loader.num_images} images of {loader.num_classes} classes; "
                    f"a batch {list(images.shape)} read")
    except Exception as exc:
        report.problem(f"training data rec={config.rec!r} is not readable ({type(exc).__name__}: {exc})",
                       "point rec at a folder with train.rec + train.idx (or an image folder, or 'synthetic') "
                       "that every host can read")
    if comm.rank != 0:
        return
    from partialfc.eval.verification import load_bin
    for name in config.val_targets or ():
        path = val_bin_path(config, name)
        if path is None:
            report.problem(f"verification set {name!r} is missing (looked for "
                           f"{os.path.join(os.fspath(config.rec), name + '.bin')})",
                           "put the .bin next to train.rec, or drop it from val_targets")
            continue
        try:
            images, issame = load_bin(path)
            report.line(f"verification set {name}: {path}, {len(issame)} pairs")
        except Exception as exc:
            report.problem(f"verification set {name!r} ({path}) is not readable ({type(exc).__name__}: {exc})",
                           "rebuild it with `python -m partialfc.tools.make_bin`, or copy it again")


def _gather_text(comm, text, device):
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    lengths = comm.allgather(torch.tensor([data.numel()], dtype=torch.int64, device=device)).cpu()
    longest = max(1, int(lengths.max()))
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[:data.numel()] = data
    rows = comm.allgather(buf).view(comm.size, longest).cpu()
    return [bytes(rows[r, :int(lengths[r])].tolist()).decode() for r in range(comm.size)]


def _setup(config):
    from partialfc.comm import get_comm
    if config is not None:
        from partialfc.train import training_device
        return training_device(config)
    use_cuda = torch.cuda.is_available()
    comm = get_comm("auto", "cuda" if use_cuda else "cpu")
    device = torch.device("cuda", comm.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return comm, device


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m partialfc.tools.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="a training config file (its data and device are checked)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = parser.parse_args(argv)
    from partialfc.comm import launcher_rank
    from partialfc.config import ConfigError, load_config
    config = None
    if args.config:
        try:
            config = load_config(args.config, args.overrides)
        except ConfigError as exc:
            print(f"[rank {launcher_rank()}] error: {exc}", file=sys.stderr)
            return 1
    try:
        comm, device = _setup(config)
    except Exception as exc:
        print(f"[rank {launcher_rank()}] doctor: the communicator did not start ({type(exc).__name__}: {exc}); "
              f"check the launcher's rendezvous (MASTER_ADDR/MASTER_PORT, the hosts list)", file=sys.stderr)
        return 1
    report = Report(comm.rank)
    iface, source = network_interface()
    report.line(f"host {socket.gethostname()}, pid {os.getpid()}, local rank {comm.local_rank}, device {device}, "
                f"backend {comm.backend}, network interface {iface} ({source})")
    check_extension(report, device)
    check_collectives(report, comm, device)
    if config is not None:
        check_data(report, config, comm)
    else:
        report.line("no config given: the training data and verification sets are not checked")
    texts = _gather_text(comm, json.dumps({"lines": report.lines, "problems": report.problems}), device)
    reports = [json.loads(t) for t in texts]
    problems = {}  # (what, advice) -> ranks
    for rank, rep in enumerate(reports):
        for what, advice in rep["problems"]:
            problems.setdefault((what, advice), []).append(rank)
    if comm.rank == 0:
        for rank, rep in enumerate(reports):
            for text in rep["lines"]:
                print(f"[rank {rank}/{comm.size}] {text}")
        if problems:
            print(f"doctor: {len(problems)} problem(s)")
            for (what, advice), ranks in problems.items():
                print(f"  rank(s) {ranks}: {what}\n    advice: {advice}")
        else:
            print("doctor: OK")
        sys.stdout.flush()
    comm.barrier()
    comm.shutdown()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
