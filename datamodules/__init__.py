"""Task datamodules for lightning-maml: each yields :class:`lightning_maml.TaskBatch` es."""

from datamodules.base import MetaDataModule, Task, TaskSampler
from datamodules.cifar import CIFARFSDataModule, FC100DataModule
from datamodules.episodes import EpisodeSampler, EpisodicDataModule
from datamodules.linear_tasks import LinearTasks, LinearTasksDataModule
from datamodules.miniimagenet import MiniImageNetDataModule
from datamodules.omniglot import OmniglotDataModule
from datamodules.sinusoid import SinusoidDataModule, SinusoidTasks
from datamodules.taskset import TaskSetDataModule, TaskSetSampler, TaskSource

__all__ = [
    "CIFARFSDataModule",
    "EpisodeSampler",
    "EpisodicDataModule",
    "FC100DataModule",
    "LinearTasks",
    "LinearTasksDataModule",
    "MetaDataModule",
    "MiniImageNetDataModule",
    "OmniglotDataModule",
    "SinusoidDataModule",
    "SinusoidTasks",
    "Task",
    "TaskSampler",
    "TaskSetDataModule",
    "TaskSetSampler",
    "TaskSource",
]
