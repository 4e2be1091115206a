"""SGD with momentum and weight decay for the class centers, applied to the sampled rows only."""
import torch


class SparseSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` semantics (dampening 0, no Nesterov) restricted to the rows sampled this step.

    Rows that were not sampled keep their weight and momentum bit for bit: no decay, no momentum drift.
    It is a ``torch.optim.Optimizer`` over ``[pfc.weight]``, so LR schedulers and ``state_dict`` work; the
    gradient it applies is ``pfc.center_grad``.
    """

    def __init__(self, pfc, lr, momentum=0.9, weight_decay=5e-4):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__([pfc.weight], dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.pfc = pfc

    def materialize_state(self):
        """The state of ``pfc.weight`` (``{"momentum_buffer": [C, D]}``), allocated (zeros) if missing, so a
        checkpoint taken before the first step holds it too."""
        weight = self.param_groups[0]["params"][0]
        state = self.state[weight]
        if "momentum_buffer" not in state:
            # Allocated like the table (huge pages on CPU): the update touches S scattered rows of both.
            state["momentum_buffer"] = self.pfc.ops.empty_table(weight.shape, weight.dtype).zero_()
        return state

    def momentum_buffer(self):
        return self.materialize_state()["momentum_buffer"]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        weight = self.param_groups[0]["params"][0]
        buf = self.state[weight].get("momentum_buffer") if weight in self.state else None
        if buf is not None and buf.shape == weight.shape:
            # Back the restored buffer like a fresh one (see momentum_buffer).
            self.state[weight]["momentum_buffer"] = self.pfc.ops.empty_table(buf.shape, buf.dtype).copy_(buf)

    @torch.no_grad()
    def step(self, closure=None, grad_scale=1.0):
        """Apply ``pfc.center_grad / grad_scale`` to ``pfc.weight[pfc.sampled_index]``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pfc.center_grad is not None:
            group = self.param_groups[0]
            self.pfc.center_grad.sgd_update(group["params"][0], self.momentum_buffer(), group["lr"],
                                            group["momentum"], group["weight_decay"], grad_scale)
        return loss

    def zero_grad(self, set_to_none=True):
        if self.pfc.center_grad is not None:
            self.pfc.center_grad.clear()
