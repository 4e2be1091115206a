"""The training engine around ``partialfc.train.Trainer``: its hooks, its checkpointer and the stuck-rank
watchdog."""
from .checkpointer import Checkpointer
from .hooks import CheckpointHook, HookBase, LoggerHook, LRSchedulerHook, WatchdogHook, default_hooks
from .watchdog import StepWatchdog

__all__ = ["CheckpointHook", "Checkpointer", "HookBase", "LRSchedulerHook", "LoggerHook", "StepWatchdog",
           "WatchdogHook", "default_hooks"]
