"""The training engine around ``partialfc.train.Trainer``: its hooks and its checkpointer."""
from .checkpointer import Checkpointer
from .hooks import CheckpointHook, HookBase, LoggerHook, LRSchedulerHook, default_hooks

__all__ = ["CheckpointHook", "Checkpointer", "HookBase", "LRSchedulerHook", "LoggerHook", "default_hooks"]
