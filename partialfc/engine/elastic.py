"""Elastic training: a run that outlives a lost rank and takes in a rank that joins (``elastic=True``).

The class centers are sharded by rank, so a lost rank's shard exists nowhere but in the checkpoints: what an
elastic run commits is its newest sealed checkpoint (written every ``save_every`` steps), and every change of
the world continues the run from it, on the new world size (centers and per-row optimizer state re-split,
the data at the checkpoint's sample count, the per-rank batch that keeps the run's global batch).

- **torchrun elastic** restarts the worker processes after a failure (``--max-restarts``) and when a node
  leaves or joins. A membership change is not counted in ``TORCHELASTIC_RESTART_COUNT``, and a node that
  joins late starts its workers at count 0, so the count cannot tell a restart from the job's first start.
  An elastic worker therefore always continues the output folder's run from its newest checkpoint when
  there is one (``resume`` is implied): the first start of a new run finds none and starts fresh.
- **Horovod elastic** keeps the processes and re-initializes Horovod on the new set of hosts
  (``hvd.elastic.run``). ``CheckpointState`` is the committed state: its ``commit`` is the checkpoint, taken
  by the checkpoint hook, then the check for hosts added or removed. After a reset every rank builds a new
  ``Trainer`` for the new world and resumes it from the newest checkpoint, exactly as a restarted torchrun
  worker does; a rank that joins gets its shard the same way.

See ``docs/elastic.md``.
"""
import copy
import json
import os

import torch

from ..config import ConfigError
from .run_folder import read_run, sealed_checkpoints
from .hooks import HookBase


def torchrun_restart():
    """``(restart_count, max_restarts)`` under torchrun, None under any other launcher."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if count is None or not count.isdigit():
        return None
    return int(count), int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def horovod_elastic():
    """True in a worker of ``horovodrun`` in elastic mode (``--min-np``/``--max-np``/``--host-discovery-script``)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def check_elastic_config(config):
    """An elastic run continues its folder's run at every restart: it needs checkpoints, and it must never
    remove them."""
    if not config.get("elastic"):
        return
    if not config.save_every:
        raise ConfigError("elastic=True needs save_every (steps between checkpoints): a restart continues from "
                          "the newest checkpoint, and without one every restart would start the run over")
    if config.overwrite:
        raise ConfigError("elastic=True with overwrite=True would remove the run's own checkpoints at every "
                          "restart; start the run once without elastic and overwrite=True, or give it another "
                          "output=...")


def run_global_batch(output):
    """``(global batch, checkpoint folder)`` of the newest sealed checkpoint of ``output``'s run, or None when
    the run has none. Only the small ``global_batch`` entry of ``trainer.pt`` is read (memory-mapped)."""
    run = read_run(output)
    owner = run["run_id"] if run else None
    for step, run_id in reversed(sealed_checkpoints(output)):
        if owner and run_id and run_id != owner:
            continue
        folder = os.path.join(output, "checkpoints", f"step_{step}")
        try:
            trainer = torch.load(os.path.join(folder, "trainer.pt"), map_location="cpu", weights_only=True,
                                 mmap=True)
        except Exception:  # damaged: resume names it and falls back to an older one
            continue
        batch = trainer.get("global_batch")
        if batch is None:  # checkpoints of earlier versions
            try:
                saved = json.loads(trainer.get("config") or "{}")
                batch = int(trainer.get("world_size") or 1) * int(saved["batch_size"])
            except (ValueError, KeyError, TypeError):
                continue
        return int(batch), folder
    return None


def per_rank_batch(global_batch, world_size, where):
    """The per-rank batch that keeps ``global_batch`` on ``world_size`` ranks; an error naming the values when
    it does not divide."""
    if global_batch % world_size:
        fits = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise ConfigError(f"elastic: the run's global batch {global_batch} ({where}) does not divide over "
                          f"{world_size} ranks; run it on a number of ranks that divides {global_batch} "
                          f"({', '.join(map(str, fits[:12]))}{', ...' if len(fits) > 12 else ''})")
    return global_batch // world_size


def elastic_config(config, comm, device, log):
    """The config a worker of an elastic run trains with: ``resume=True``, and ``batch_size`` the run's global
    batch (its newest checkpoint's) over this world size. A fresh start keeps ``batch_size``. Rank 0 reads the
    folder and broadcasts, so every rank takes the same batch."""
    check_elastic_config(config)
    found = run_global_batch(config.output) if comm.rank == 0 else None
    batch = comm.broadcast(torch.tensor([found[0] if found else 0], dtype=torch.int64, device=device), root=0)
    global_batch = int(batch.item())
    config = copy.deepcopy(config)
    config.resume = True
    restart = torchrun_restart()
    launcher = ("torchrun" + (f", restart {restart[0]} of at most {restart[1]}" if restart else "")
                if restart else "horovod elastic" if horovod_elastic() else comm.backend)
    if not global_batch:
        log(f"elastic ({launcher}): no checkpoint of this folder's run yet; world size {comm.size}, batch_size "
            f"{config.batch_size} per rank")
        return config
    where = os.path.basename(found[1]) if found else "its newest checkpoint"
    config.batch_size = per_rank_batch(global_batch, comm.size, where)
    log(f"elastic ({launcher}): world size {comm.size}, batch_size {config.batch_size} per rank keeps the run's "
        f"global batch {global_batch} ({where})")
    return config


class CheckpointState:
    """Horovod elastic's committed state for a sharded run: the newest checkpoint.

    ``hvd.elastic.run`` calls ``sync`` before (re)entering the training function, ``restore`` after a
    ``HorovodInternalError`` and ``on_reset`` after re-initializing Horovod. Nothing is kept in memory: the
    training function builds a ``Trainer`` for the world it finds, which resumes from the newest checkpoint
    (the same files on every rank, the backbone then broadcast from rank 0), so there is nothing to restore
    or to sync. ``commit`` runs after each sealed checkpoint (``CommitHook``) and raises
    ``HostsUpdatedInterrupt`` when hosts were added or removed: the run then resets at a step that costs no
    redone work."""

    def __init__(self):
        import horovod.torch as hvd
        from horovod.common.elastic import State

        class _State(State):
            def save(self):
                pass  # the checkpoint hook has written the checkpoint

            def restore(self):
                pass  # the uncommitted steps are dropped with the Trainer

            def sync(self):
                pass  # the new Trainer resumes every rank from the same checkpoint

        self.state = _State(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.resets = 0
        self.state.register_reset_callbacks([self._count_reset])

    def _count_reset(self):
        self.resets += 1


class CommitHook(HookBase):
    """Horovod elastic: after every sealed checkpoint, commit (and so check for added or removed hosts)."""

    def __init__(self, state):
        self.state = state

    def after_step(self):
        t = self.trainer
        if t.checkpointer.saved_step == t.step:
            self.state.commit()


def run_horovod_elastic(config, make_trainer):
    """Train ``config`` under ``horovodrun`` in elastic mode; ``make_trainer(config)`` builds a ``Trainer`` for
    the current world. Returns the trainer that finished the run."""
    import horovod.torch as hvd
    from ..comm import reset_comm

    hvd.init()
    holder = CheckpointState()

    @hvd.elastic.run
    def train(state):
        reset_comm()  # rank and size of the world Horovod was (re)initialized with
        trainer = make_trainer(config)
        if holder.resets:
            trainer.log(f"horovod elastic: reset {holder.resets}, training continues on world size "
                        f"{trainer.comm.size} from step {trainer.step}")
        trainer.register_hooks([CommitHook(state)])
        trainer.train()
        return trainer

    return train(holder.state)
