"""Task datamodules for lightning-maml: each yields :class:`lightning_maml.TaskBatch` es."""

from lightning_maml.datamodules.base import MetaDataModule, Task, TaskSampler
from lightning_maml.datamodules.cifar import CIFARFSDataModule, FC100DataModule
from lightning_maml.datamodules.episodes import EpisodeSampler, EpisodicDataModule
from lightning_maml.datamodules.linear_tasks import LinearTasks, LinearTasksDataModule
from lightning_maml.datamodules.miniimagenet import MiniImageNetDataModule
from lightning_maml.datamodules.omniglot import OmniglotDataModule
from lightning_maml.datamodules.sinusoid import SinusoidDataModule, SinusoidTasks
from lightning_maml.datamodules.taskset import TaskSetDataModule, TaskSetSampler, TaskSource

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
