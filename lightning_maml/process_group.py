"""The default process group destroyed at exit, which Lightning leaves alive when it uses gloo."""

from __future__ import annotations

import atexit

import torch

__all__ = ["destroy_process_group_at_exit"]


def destroy_process_group_at_exit() -> None:
    """Destroys the default process group, if one is initialized now, when the process exits.

    Lightning destroys only NCCL process groups at exit; a gloo group left alive can abort the
    process as it exits ("terminate called without an active exception", seen in ddp_spawn tests
    on CPU). Registered once, however many runs call it.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_destroy_process_group)
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
