"""Small periodic hooks around the training loop, in the spirit of detectron2's HookBase.

The trainer owns the step; each hook sees the trainer (``self.trainer``) and reacts at three moments.
Hooks must not change what a step computes, only observe it or act between steps.
"""


class HookBase:
    trainer = None  # set by Trainer.register_hooks

    def before_train(self):
        pass

    def after_step(self):
        """Called after every optimizer step; ``self.trainer.step`` is the number of steps done."""

    def after_train(self):
        pass
