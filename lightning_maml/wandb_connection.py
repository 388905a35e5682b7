"""Whether W&B can log in now, offline mode when it cannot, and closing a command's W&B runs."""

from __future__ import annotations

import netrc
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = [
    "default_wandb_offline",
    "finish_wandb_runs",
    "wandb_base_url",
    "wandb_credentials_present",
    "wandb_reachable",
]


def wandb_base_url() -> str:
    """The W&B server the SDK talks to: ``WANDB_BASE_URL`` or the SDK's default."""
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def wandb_credentials_present(base_url: str | None = None) -> bool:
    """Whether W&B could log in without asking: a key in the environment or in the netrc file.

    Args:
        base_url: The W&B server (default: :func:`wandb_base_url`).
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    hosts = {urlsplit(base_url or wandb_base_url()).hostname}
    if not os.environ.get("WANDB_BASE_URL"):
        # The SDK's default server has gone by two names; a key saved under either one works.
        hosts.add("api.wandb.ai")
    # An explicit path, as W&B reads it: the default one would also fail on loose permissions.
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        keys = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    return any(keys.authenticators(host) for host in hosts if host)


def wandb_reachable(base_url: str | None = None, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server (or the proxy in front of it) opens in time.

    Without this, a run that has a key but no network waits about two minutes in ``wandb.init``
    and then fails.
    """
    url = urlsplit(base_url or wandb_base_url())
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(url.hostname or ""):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        address = (proxy_url.hostname, proxy_url.port or 80)
    connected: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                connected.append(True)
        except OSError:
            pass

    # The name lookup ignores socket timeouts, so the whole attempt runs in a thread we wait on.
    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout)
    return bool(connected)


def default_wandb_offline() -> bool:
    """Sets ``WANDB_MODE=offline`` when no mode is chosen and W&B could not log in right now.

    That is: no credentials (W&B would prompt for a key, or fail without a terminal), or a
    server that does not answer (W&B would wait, then fail). Offline, W&B writes a local run that
    ``wandb sync`` uploads later. Returns whether offline mode was chosen here.
    """
    if os.environ.get("WANDB_MODE"):
        return False
    base_url = wandb_base_url()
    if not wandb_credentials_present(base_url):
        reason = "no W&B API key found"
    elif not wandb_reachable(base_url):
        reason = f"the W&B server {urlsplit(base_url).hostname} does not answer"
    else:
        return False
    os.environ["WANDB_MODE"] = "offline"
    rank_zero_info(f"{reason}: W&B logs offline (set WANDB_MODE to choose).")
    return True


def finish_wandb_runs(trainer) -> None:
    """Closes the W&B runs of ``trainer``, printing ``wandb sync`` for offline ones.

    A command is one run: closing it keeps a later command in the same process (a test after
    a fit, say) from appending to it.
    """
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger) or trainer.global_rank != 0:
            continue
        run = logger.experiment
        if run.offline:  # "offline", or "dryrun" as WandbLogger(offline=True) sets it
            run_dir = Path(run.dir).parent
            rank_zero_info(f"W&B run saved offline; upload it with:\n  wandb sync {run_dir}")
        run.finish()
