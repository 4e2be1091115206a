"""SGD with momentum and weight decay for the class centers, applied to the sampled rows only."""
import torch

from .precision import is_low_precision, rounding_seed_of


def rounding_args(pfc, state):
    """The update ops' stochastic-rounding arguments for a step on ``pfc``'s table: none for a float32 (or
    float64) table, which the ops round to nearest; for a bfloat16 / float16 table the run's seed, the
    optimizer's step count ``state["rounding_step"]`` and the shard's first global row, so that every shard
    rounds its rows as the whole table would (K rows per identity: the rows of identity c are c*K .. c*K+K-1)."""
    weight = pfc.weight
    if not is_low_precision(weight.dtype):
        return {}
    return dict(rounding_seed=rounding_seed_of(pfc.seed), rounding_step=int(state["rounding_step"]),
                class_start=pfc.class_start * pfc.num_subcenters)


def restore_rounding_step(state, saved):
    """``state["rounding_step"]`` from a loaded state dict's entry ``saved`` (torch.optim casts every state tensor to
    the table's dtype, which cannot count far in bfloat16); 0 when a checkpoint of an earlier version lacks it."""
    count = saved.get("rounding_step") if saved else None
    if count is not None and (torch.as_tensor(count).is_floating_point() or torch.as_tensor(count).numel() != 1):
        raise ValueError(f"center optimizer state_dict: rounding_step must be one integer, got {count!r}")
    state["rounding_step"] = torch.tensor(int(count) if count is not None else 0, dtype=torch.int64)


class SparseSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` semantics (dampening 0, no Nesterov) restricted to the rows sampled this step.

    Rows that were not sampled keep their weight and momentum bit for bit: no decay, no momentum drift.
    It is a ``torch.optim.Optimizer`` over ``[pfc.weight]``, so LR schedulers and ``state_dict`` work; the
    gradient it applies is ``pfc.center_grad``.

    The momentum is stored in the table's dtype. ``rounding_step`` (int64, in the state) counts the steps that
    updated the table: on a bfloat16 / float16 table it keys the stochastic rounding of step t, so a resumed run
    rounds as an uninterrupted one.
    """

    def __init__(self, pfc, lr, momentum=0.9, weight_decay=5e-4):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__([pfc.weight], dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.pfc = pfc

    def materialize_state(self):
        """The state of ``pfc.weight`` (``{"momentum_buffer": [C, D] in the table's dtype, "rounding_step": int64
        []}``), allocated (zeros) if missing, so a checkpoint taken before the first step holds it too."""
        weight = self.param_groups[0]["params"][0]
        state = self.state[weight]
        if "momentum_buffer" not in state:
            # Allocated like the table (huge pages on CPU): the update touches S scattered rows of both.
            state["momentum_buffer"] = self.pfc.ops.empty_table(weight.shape, weight.dtype).zero_()
        if "rounding_step" not in state:
            state["rounding_step"] = torch.tensor(0, dtype=torch.int64)
        return state

    def momentum_buffer(self):
        return self.materialize_state()["momentum_buffer"]

    def load_state_dict(self, state_dict):
        # torch.optim casts the momentum to the table's dtype (a checkpoint of another center_dtype converts to
        # nearest) and the step count too: that one is taken from the incoming dict.
        incoming = list(state_dict.get("state", {}).values())
        super().load_state_dict(state_dict)
        weight = self.param_groups[0]["params"][0]
        if weight not in self.state:
            return
        buf = self.state[weight].get("momentum_buffer")
        if buf is not None and buf.shape == weight.shape:
            # Back the restored buffer like a fresh one (see momentum_buffer).
            self.state[weight]["momentum_buffer"] = self.pfc.ops.empty_table(buf.shape, weight.dtype).copy_(buf)
        restore_rounding_step(self.state[weight], incoming[0] if incoming else None)

    @torch.no_grad()
    def step(self, closure=None, grad_scale=1.0):
        """Apply ``pfc.center_grad / grad_scale`` to ``pfc.weight[pfc.sampled_index]``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        center_grad = self.pfc.center_grad
        if center_grad is not None and center_grad.normalized_grad is not None:
            group = self.param_groups[0]
            state = self.materialize_state()
            center_grad.sgd_update(group["params"][0], state["momentum_buffer"], group["lr"], group["momentum"],
                                   group["weight_decay"], grad_scale, rounding_args(self.pfc, state))
            state["rounding_step"] += 1
        return loss

    def zero_grad(self, set_to_none=True):
        if self.pfc.center_grad is not None:
            self.pfc.center_grad.clear()
