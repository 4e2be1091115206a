"""Run under a launcher: trains on the embedded synthetic set and writes the losses rank 0 saw.

    python resume_world_size_worker.py LOSSES_JSON key=value [key=value ...]

The backbone is ``flat_test``: pooling and one linear layer, no BatchNorm. BatchNorm's statistics are
taken over each rank's own batch, so with BatchNorm the loss depends on how the global batch is split into
ranks; without it (and at sample_rate=1) a step's loss is the same for 2 x 12 and 3 x 8.
"""
import json
import os
import sys

from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from partialfc.backbones import register_backbone  # noqa: E402
from partialfc.config import load_config  # noqa: E402
from partialfc.engine.hooks import HookBase  # noqa: E402
from partialfc.train import Trainer  # noqa: E402


@register_backbone("flat_test")
def flat_test(num_features=32, **_):
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 14 * 14, num_features))


class Losses(HookBase):
    def __init__(self):
        self.losses = {}

    def after_step(self):
        self.losses[self.trainer.step] = self.trainer.last_loss


def main():
    out, overrides = sys.argv[1], sys.argv[2:]
    config = load_config(os.path.join(ROOT, "configs", "synthetic.py"), overrides)
    trainer = Trainer(config)
    hook = Losses()
    trainer.register_hooks([hook])
    trainer.train()
    if trainer.comm.rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": trainer.comm.size, "losses": hook.losses}, f)
    trainer.comm.shutdown()


if __name__ == "__main__":
    main()
