"""SGD with momentum and weight decay for the class centers, applied to the sampled rows only."""
import torch

from .. import ops


class SparseSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` semantics (dampening 0, no Nesterov) restricted to the rows sampled this step.

    Rows that were not sampled keep their weight and momentum bit for bit: no decay, no momentum drift.
    It is a ``torch.optim.Optimizer`` over ``[pfc.weight]``, so LR schedulers and ``state_dict`` work.
    """

    def __init__(self, pfc, lr, momentum=0.9, weight_decay=5e-4):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__([pfc.weight], dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.pfc = pfc

    def momentum_buffer(self):
        weight = self.param_groups[0]["params"][0]
        state = self.state[weight]
        if "momentum_buffer" not in state:
            # Huge pages where the OS allows, like the table: the update touches S scattered rows of both.
            buf = ops.empty_huge(weight.shape, weight.dtype, weight.device) if weight.device.type == "cpu" else None
            state["momentum_buffer"] = buf.zero_() if buf is not None else torch.zeros_like(weight)
        return state["momentum_buffer"]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        weight = self.param_groups[0]["params"][0]
        buf = self.state[weight].get("momentum_buffer") if weight in self.state else None
        if buf is not None and buf.device.type == "cpu" and buf.numel() == weight.numel():
            # Back the restored buffer with huge pages too (see momentum_buffer).
            self.state[weight]["momentum_buffer"] = ops.empty_huge(buf.shape, buf.dtype).copy_(buf)

    @torch.no_grad()
    def step(self, closure=None, grad_scale=1.0):
        """Apply ``pfc.sampled_rows.grad / grad_scale`` to ``pfc.weight[pfc.sampled_index]``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        take = getattr(self.pfc, "_take_pending_grad", None)
        pending = take() if take is not None else None
        if pending is not None:
            # Fused path (CPU kernels): the normalize backward folded into the update, no [S, D] rows written.
            pending.apply_update(self.pfc._workspace, group["params"][0], self.momentum_buffer(),
                                 self.pfc.sampled_index, group["lr"], group["momentum"], group["weight_decay"],
                                 grad_scale)
            return loss
        rows = self.pfc.sampled_rows
        if rows is None or rows.grad is None:
            return loss
        grad = rows.grad if grad_scale == 1.0 else rows.grad / grad_scale
        impl = getattr(self.pfc, "_ops", ops)  # the head's op set (reference ops when use_ext=False)
        impl.sparse_sgd_update(group["params"][0], self.momentum_buffer(), self.pfc.sampled_index, grad,
                               group["lr"], group["momentum"], group["weight_decay"])
        return loss

    def zero_grad(self, set_to_none=True):
        clear = getattr(self.pfc, "_clear_grad", None)
        if clear is not None:
            clear()
        elif self.pfc.sampled_rows is not None:
            self.pfc.sampled_rows.grad = None
