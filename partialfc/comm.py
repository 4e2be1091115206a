"""One communicator interface over Horovod, torch.distributed, or a single process.

The backend is found from the launcher's environment (``comm_backend="auto"``) or forced:

- ``horovod``: under ``horovodrun`` or ``mpirun`` (Horovod over MPI, Gloo or NCCL);
- ``torch``: under ``torchrun``, or under ``mpirun`` where mpi4py tells each process its rank and rank 0
  publishes the rendezvous address;
- ``single``: no launcher; world size 1 and every collective is the identity.

All collectives take and return tensors on the caller's device; ``allgather`` concatenates along dim 0.
Gradient-carrying collectives are autograd functions (see ``AllGather``).
"""
import contextlib
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def _launcher_backend():
    env = os.environ
    if "HOROVOD_RANK" in env:  # horovodrun (Gloo controller)
        return "horovod"
    if any(v in env for v in _MPI_RANK_VARS):  # mpirun, directly or through horovodrun
        try:
            import horovod.torch  # noqa: F401
            return "horovod"
        except ImportError:
            return "torch"
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        return "torch"
    return "single"


class Communicator:
    """The interface. ``rank``/``size``/``local_rank`` are ints; ``backend`` names the implementation."""

    backend = "single"
    rank = 0
    size = 1
    local_rank = 0

    def allgather(self, tensor):
        return tensor.clone()

    def allreduce(self, tensor, op="sum"):
        if op not in ("sum", "max"):
            raise ValueError(f"allreduce op must be 'sum' or 'max', got {op!r}")
        return tensor.clone()

    def reduce_scatter(self, tensor):
        """Sum over ranks, then this rank's equal ``size``-th slice of dim 0."""
        self._check_scatter(tensor)
        return self.allreduce(tensor, "sum").chunk(self.size)[self.rank].contiguous()

    def _check_scatter(self, tensor):
        if tensor.shape[0] % self.size:
            raise ValueError(f"reduce_scatter needs dim 0 ({tensor.shape[0]}) divisible by world size {self.size}")

    def broadcast(self, tensor, root=0):
        return tensor.clone()

    def barrier(self):
        pass

    # --- data parallelism for the backbone (class-center shards never go through these) ---
    def broadcast_module(self, module, root=0):
        """Copy rank ``root``'s parameters and buffers to every rank."""

    def data_parallel(self, module, optimizer, gradient_acc=1):
        """``(forward module, optimizer)`` whose backbone gradients are summed over ranks."""
        return module, optimizer

    def zero_redundancy_optimizer(self, params, optimizer_class, **kwargs):
        """An ``optimizer_class`` whose state is sharded over ranks (ZeRO stage 1), for ``data_parallel``."""
        from .config import ConfigError
        raise ConfigError(f"zero_optimizer=True is not supported with the {self.backend!r} backend: it shards "
                          "optimizer state through torch.distributed; launch with torchrun or set "
                          "comm_backend='torch'")

    # --- the training step's hand-offs with the data-parallel wrapper; no-ops in one process ---
    def no_sync(self, model):
        """Context for a backward that must only accumulate gradients (every micro-batch but the last)."""
        return contextlib.nullcontext()

    def wait_for_gradients(self, optimizer):
        """Block until the backbone gradients of the last backward are summed over ranks, so they can be
        read (unscaled, clipped, checked) before the step."""

    def step_after_wait(self, optimizer):
        """``optimizer.step()`` on gradients that ``wait_for_gradients`` has already summed."""
        optimizer.step()

    def consolidate_optimizer_state(self, optimizer, root=0):
        """Gather a sharded optimizer's state on ``root``, so that its ``state_dict()`` is whole there.
        Every rank calls it; a no-op for an optimizer whose state is not sharded."""

    def shutdown(self):
        pass

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"


SingleProcessComm = Communicator


class HorovodComm(Communicator):
    backend = "horovod"

    def __init__(self):
        import horovod.torch as hvd

        # Horovod: initialize the library; rank and size come from horovodrun / mpirun.
        hvd.init()
        self.hvd = hvd
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()

    def allgather(self, tensor):
        # Horovod: allgather concatenates along dim 0 and accepts different lengths per rank.
        return self.hvd.allgather(tensor.contiguous())

    def allreduce(self, tensor, op="sum"):
        ops = {"sum": self.hvd.Sum, "max": self.hvd.Max}
        if op not in ops:
            raise ValueError(f"allreduce op must be 'sum' or 'max', got {op!r}")
        return self.hvd.allreduce(tensor.contiguous(), op=ops[op])

    def reduce_scatter(self, tensor):
        self._check_scatter(tensor)
        return self.hvd.reducescatter(tensor.contiguous(), op=self.hvd.Sum)

    def broadcast(self, tensor, root=0):
        return self.hvd.broadcast(tensor.contiguous(), root_rank=root)

    def barrier(self):
        self.hvd.barrier()

    def broadcast_module(self, module, root=0):
        # Horovod: start every rank from rank 0's backbone.
        self.hvd.broadcast_parameters(module.state_dict(), root_rank=root)

    def data_parallel(self, module, optimizer, gradient_acc=1):
        # Horovod: allreduce backbone gradients during backward. Sum, not average: each rank's gradient is
        # already its share of the global-batch mean loss, so the sum is the exact global gradient.
        optimizer = self.hvd.DistributedOptimizer(
            optimizer, named_parameters=module.named_parameters(), op=self.hvd.Sum,
            backward_passes_per_step=gradient_acc)
        return module, optimizer

    # No no_sync: backward_passes_per_step makes the DistributedOptimizer allreduce on the last micro-batch.

    def wait_for_gradients(self, optimizer):
        # Horovod: the allreduces started during backward are asynchronous; wait for their sums.
        optimizer.synchronize()

    def step_after_wait(self, optimizer):
        # Horovod: step() would synchronize again; the gradients are already summed.
        with optimizer.skip_synchronize():
            optimizer.step()

    def shutdown(self):
        self.hvd.shutdown()


def _mpi_rendezvous():
    """Rank, size and a TCP address for torch.distributed, taken from MPI through mpi4py."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    address = None
    if world.Get_rank() == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        host = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        address = f"tcp://{host}:{port}"
    address = world.bcast(address, root=0)
    local_rank = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", 0)))
    return world.Get_rank(), world.Get_size(), local_rank, address


def process_group_timeout(collective_timeout):
    """The timeout of every torch.distributed collective: ``collective_timeout``, but never below torch's
    own default (30 min). The process group's clock also runs through the set-up before the first step
    (the rendezvous, rank 0 generating the synthetic set or reading a checkpoint while the others wait),
    which the step watchdog leaves out; a short ``collective_timeout`` must not cut that short. A longer one
    lets a long evaluation or save on rank 0 finish. None keeps torch's default."""
    from torch.distributed.constants import default_pg_timeout

    if collective_timeout is None:
        return default_pg_timeout
    return max(default_pg_timeout, datetime.timedelta(seconds=collective_timeout))


def _sum_allreduce_hook(process_group, bucket):
    # torch.distributed: DDP averages by default; we want the sum (see HorovodComm.data_parallel).
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class TorchDistComm(Communicator):
    backend = "torch"

    def __init__(self, device_type="cpu", timeout=None):
        # On GPUs, NCCL for CUDA tensors and Gloo for CPU ones: small host-side flags and counters (a step's
        # skip vote, checkpoint digests) then work as they do on CPU, instead of failing with "No backend
        # type associated with device type cpu".
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if not dist.is_initialized():
            kwargs = dict(timeout=process_group_timeout(timeout))
            if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
                # torch.distributed: torchrun's env:// rendezvous.
                local_rank = int(os.environ.get("LOCAL_RANK", 0))
                dist.init_process_group(backend, **kwargs)
            else:
                rank, size, local_rank, address = _mpi_rendezvous()
                dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, **kwargs)
        else:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.rank, self.size, self.local_rank = dist.get_rank(), dist.get_world_size(), local_rank
        self._nccl = device_type == "cuda"

    def allgather(self, tensor):
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.size * tensor.shape[0],) + tuple(tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor)
        return out

    def allreduce(self, tensor, op="sum"):
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"allreduce op must be 'sum' or 'max', got {op!r}")
        out = tensor.clone()
        dist.all_reduce(out, op=ops[op])
        return out

    def reduce_scatter(self, tensor):
        if not (self._nccl and tensor.is_cuda):  # Gloo has no reduce_scatter
            return super().reduce_scatter(tensor)
        self._check_scatter(tensor)
        out = tensor.new_empty((tensor.shape[0] // self.size,) + tuple(tensor.shape[1:]))
        dist.reduce_scatter_tensor(out, tensor.contiguous())
        return out

    def broadcast(self, tensor, root=0):
        out = tensor.clone().contiguous()
        dist.broadcast(out, src=root)
        return out

    def barrier(self):
        dist.barrier()

    def broadcast_module(self, module, root=0):
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=root)

    def data_parallel(self, module, optimizer, gradient_acc=1):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(module.parameters()).is_cuda else None
        ddp = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
        ddp.register_comm_hook(None, _sum_allreduce_hook)
        return ddp, optimizer

    def zero_redundancy_optimizer(self, params, optimizer_class, **kwargs):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, **kwargs)

    def no_sync(self, model):
        # DDP allreduces during every backward unless told to only accumulate.
        return model.no_sync()

    def consolidate_optimizer_state(self, optimizer, root=0):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if isinstance(optimizer, ZeroRedundancyOptimizer):
            optimizer.consolidate_state_dict(to=root)

    def shutdown(self, timeout_s=300.0):
        if dist.is_initialized():
            # Tear down only once every rank has finished its collectives: a rank that destroys its Gloo
            # pairs while a peer is still reading from them can abort that peer ("terminate called without
            # an active exception"), failing a run that had finished. A barrier alone does not ensure it:
            # a rank leaves the barrier once it has its peers' messages, possibly before a peer has read the
            # last one it sent. So each rank then counts itself in at the rendezvous store, which no Gloo
            # pair carries, and closes its pairs only when every rank has left the barrier.
            dist.barrier()
            store = dist.distributed_c10d._get_default_store()
            arrived = store.add("partialfc/shutdown", 1)
            everyone = -(-arrived // self.size) * self.size  # a store that served an earlier shutdown counts on
            deadline = time.monotonic() + timeout_s
            while store.add("partialfc/shutdown", 0) < everyone:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shutdown: rank {self.rank} waited {timeout_s:.0f} s for the other ranks "
                                       "to finish their collectives")
                time.sleep(0.005)
            dist.destroy_process_group()


def launcher_rank():
    """This process's rank for a message (a string): the communicator's once it exists, else the one its
    launcher set (horovodrun, torchrun, an MPI's mpirun, Slurm's srun), ``"?"`` when none did."""
    if _COMM is not None:
        return str(_COMM.rank)
    env = os.environ
    for var in ("HOROVOD_RANK", "RANK") + _MPI_RANK_VARS + ("SLURM_PROCID",):
        if env.get(var, "").isdigit():
            return env[var]
    return "?"


_COMM = None


def reset_comm():
    """Forget the process-wide communicator, so that the next ``get_comm`` builds one for the world as it is
    now: Horovod elastic re-initializes with another rank and size after a rank is lost or added."""
    global _COMM
    _COMM = None


def get_comm(backend="auto", device_type=None, timeout=None):
    """The process-wide communicator, created on first call from the launcher's environment. ``timeout``
    is the config's ``collective_timeout`` (seconds or None), for the torch.distributed process group."""
    global _COMM
    if _COMM is not None:
        if backend not in ("auto", _COMM.backend):
            raise RuntimeError(f"communicator already initialized with backend {_COMM.backend!r}, not {backend!r}")
        return _COMM
    if backend == "auto":
        backend = _launcher_backend()
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "horovod":
        _COMM = HorovodComm()
    elif backend == "torch":
        _COMM = TorchDistComm(device_type, timeout)
    elif backend == "single":
        _COMM = SingleProcessComm()
    else:
        raise ValueError(f"unknown comm_backend {backend!r}; use auto, horovod, torch or single")
    return _COMM


class AllGather(torch.autograd.Function):
    """``[b, ...] -> [size * b, ...]``; backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, comm):
        ctx.comm = comm
        return comm.allgather(tensor)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on every gathered row, so the rows' gradient is the sum over ranks.
        return ctx.comm.reduce_scatter(grad.contiguous()), None


def allgather_with_grad(tensor, comm):
    return AllGather.apply(tensor, comm)
