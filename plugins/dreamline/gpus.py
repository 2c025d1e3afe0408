"""One GPU of its own for every local GPU step, on a machine with several (DREAMLINE_GPU_DEVICES).

Airflow's `gpu` pool bounds how many GPU steps run at once (the launcher sizes it to the GPU count); which GPU each
step gets is decided here, since a pool slot has no identity. Each device has a lock file under
`$DREAMLINE_HOME/gpus/`; the operator takes a free one with flock and hands the locked descriptor to the step's
process, which sees only that device (CUDA_VISIBLE_DEVICES). The lock lives as long as either holds it: a step
keeps its GPU even if the Airflow worker dies first, and the kernel releases it when the step ends, however it ends
(no stale lease after a kill). Two local processes never share a GPU, whatever else runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

WAIT_NOTICE = 60  # seconds between "waiting for a GPU" lines, when every device is taken


@contextlib.contextmanager
def lease(devices: tuple[str, ...], count: int, folder: Path, log=print) -> Iterator[tuple[list[str], list[int]]]:
    """`count` free devices of `devices` and their locked descriptors (to pass to the step's process), waiting while
    fewer are free (a pool sized larger than the device list, or steps of another DAG folder on the same home)."""
    if count > len(devices):
        raise ValueError(f"a step needs {count} GPUs and DREAMLINE_GPU_DEVICES lists {len(devices)}")
    folder.mkdir(parents=True, exist_ok=True)
    waited = 0.0
    while True:
        taken = _take(devices, count, folder)
        if taken:
            break
        if waited % WAIT_NOTICE == 0:
            log(f"all {len(devices)} GPUs ({','.join(devices)}) are in use; waiting for {count}")
        time.sleep(1)
        waited += 1
    try:
        yield [device for device, _ in taken], [fd for _, fd in taken]
    finally:
        for _, fd in taken:
            os.close(fd)


def _take(devices: tuple[str, ...], count: int, folder: Path) -> list[tuple[str, int]]:
    """Lock `count` free devices, or none (all or nothing, so two multi-GPU steps cannot each hold half)."""
    taken = []
    for device in devices:
        fd = os.open(folder / f"{device}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        taken.append((device, fd))
        if len(taken) == count:
            return taken
    for _, fd in taken:
        os.close(fd)
    return []
