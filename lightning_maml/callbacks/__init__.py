"""Callbacks that record what a meta-learning run does, for any Lightning logger."""

from lightning_maml.callbacks.checkpoint import ModelCheckpoint
from lightning_maml.callbacks.grad_norm import GradNormMonitor
from lightning_maml.callbacks.run_lock import RunDirectoryInUse, RunDirectoryLock
from lightning_maml.callbacks.stationarity import StationarityMonitor
from lightning_maml.callbacks.theory_step_size import TheoryStepSize

__all__ = [
    "GradNormMonitor",
    "ModelCheckpoint",
    "RunDirectoryInUse",
    "RunDirectoryLock",
    "StationarityMonitor",
    "TheoryStepSize",
]
