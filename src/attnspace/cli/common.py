"""What every ``attnspace`` subcommand shares: the logger, thread caps, the device."""

from __future__ import annotations

import logging

log = logging.getLogger("attnspace")


def set_threads(n: int) -> None:
    """Cap torch, BLAS, zarr and Dask at the rule's ``threads`` so parallel jobs do not oversubscribe."""
    import torch
    from threadpoolctl import threadpool_limits

    from attnspace.store import configure_io

    torch.set_num_threads(max(1, n))
    threadpool_limits(limits=max(1, n))
    configure_io(max(1, n))


def device() -> str:
    """``cuda`` where torch can use a GPU, else ``cpu``; refused where the job was given a GPU that torch
    cannot use (:func:`attnspace.devices.device`)."""
    from attnspace.devices import device as job_device

    return job_device()


def given(**options) -> dict:
    """The options a user gave (not None): the rest keep the library's defaults, which come
    from the config schema (one source per default)."""
    return {k: v for k, v in options.items() if v is not None}
