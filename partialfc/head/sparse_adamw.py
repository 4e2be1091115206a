"""AdamW for the class centers, applied to the sampled rows only, and ``center_optimizer``, which picks the
centers' optimizer from the run's optimizer setting."""
import torch

from .precision import exp_avg_sq_dtype
from .sparse_sgd import SparseSGD, restore_rounding_step, rounding_args

STATE_KEYS = ("exp_avg", "exp_avg_sq", "row_step")


class SparseAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` semantics (decoupled weight decay, no amsgrad) restricted to the rows sampled
    this step.

    Each row keeps its own step count (``row_step``, int64 [C]) and so its own bias corrections: a row
    sampled for the t-th time takes the t-th AdamW step, whatever the global step. Rows that were not sampled
    keep weight, both moments and step count bit for bit (no decay). With every row sampled every step
    (``sample_rate=1``) this is ``torch.optim.AdamW`` over the whole table. It is a ``torch.optim.Optimizer``
    over ``[pfc.weight]``, so LR schedulers and ``state_dict`` work; the gradient it applies is
    ``pfc.center_grad``. State per identity: two moments of D floats and one counter.

    ``exp_avg`` is stored in the table's dtype, ``exp_avg_sq`` too except on a float16 table (float32 there:
    ``partialfc.head.precision``); ``rounding_step`` counts the optimizer's steps, as in ``SparseSGD``.
    """

    def __init__(self, pfc, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        betas = tuple(float(b) for b in betas)
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        super().__init__([pfc.weight], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.pfc = pfc

    def materialize_state(self):
        """The state of ``pfc.weight`` (``exp_avg``, ``exp_avg_sq`` [C, D], ``row_step`` [C] and
        ``rounding_step`` []), allocated (zeros) if missing, so a checkpoint taken before the first step holds it
        too."""
        weight = self.param_groups[0]["params"][0]
        state = self.state[weight]
        if not all(key in state for key in STATE_KEYS):
            # Allocated like the table (huge pages on CPU): the update touches S scattered rows of each.
            table = self.pfc.ops
            state["exp_avg"] = table.empty_table(weight.shape, weight.dtype).zero_()
            state["exp_avg_sq"] = table.empty_table(weight.shape, exp_avg_sq_dtype(weight.dtype)).zero_()
            state["row_step"] = table.empty_table(weight.shape[:1], torch.int64).zero_()
        if "rounding_step" not in state:
            state["rounding_step"] = torch.tensor(0, dtype=torch.int64)
        return state

    def load_state_dict(self, state_dict):
        # torch.optim casts every state tensor to the parameter's dtype (the integer step counts too): take
        # row_step and rounding_step from the incoming dict to keep them exact, and exp_avg_sq, which a
        # float16 table keeps in float32.
        incoming = list(state_dict.get("state", {}).values())
        super().load_state_dict(state_dict)
        weight = self.param_groups[0]["params"][0]
        if not incoming:
            return
        saved = incoming[0]
        missing = [key for key in STATE_KEYS if key not in saved]
        if missing:
            raise ValueError(f"SparseAdamW state_dict: the state of the class centers lacks {missing} "
                             f"(has {sorted(saved)})")
        shapes = {"exp_avg": tuple(weight.shape), "exp_avg_sq": tuple(weight.shape), "row_step": (weight.shape[0],)}
        for key, shape in shapes.items():
            if tuple(saved[key].shape) != shape:
                raise ValueError(f"SparseAdamW state_dict: {key} is {list(saved[key].shape)}, but the class-center "
                                 f"shard needs {list(shape)}")
        if saved["row_step"].is_floating_point() or saved["row_step"].is_complex():
            raise ValueError(f"SparseAdamW state_dict: row_step must be an integer tensor, got "
                             f"{saved['row_step'].dtype}")
        # Back the restored state like a fresh one (see materialize_state).
        # A checkpoint of another center_dtype converts here, to nearest.
        table, state = self.pfc.ops, self.state[weight]
        state["exp_avg"] = table.empty_table(weight.shape, weight.dtype).copy_(state["exp_avg"])
        state["exp_avg_sq"] = table.empty_table(weight.shape, exp_avg_sq_dtype(weight.dtype)).copy_(saved["exp_avg_sq"])
        state["row_step"] = table.empty_table(weight.shape[:1], torch.int64).copy_(saved["row_step"])
        restore_rounding_step(state, saved)

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
            beta1, beta2 = group["betas"]
            center_grad.adamw_update(group["params"][0], state["exp_avg"], state["exp_avg_sq"], state["row_step"],
                                     group["lr"], beta1, beta2, group["eps"], group["weight_decay"], grad_scale,
                                     rounding_args(self.pfc, state))
            state["rounding_step"] += 1
        return loss

    def zero_grad(self, set_to_none=True):
        if self.pfc.center_grad is not None:
            self.pfc.center_grad.clear()


def center_optimizer(pfc, optimizer, lr, momentum, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """The class centers' optimizer for a run whose backbone uses ``optimizer`` ("sgd" or "adamw"), as
    arcface_torch steps the Partial FC weight with the backbone's optimizer: ``SparseSGD(lr, momentum,
    weight_decay)`` or ``SparseAdamW(lr, betas, eps, weight_decay)`` (``momentum`` unused)."""
    if optimizer == "sgd":
        return SparseSGD(pfc, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adamw":
        return SparseAdamW(pfc, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
