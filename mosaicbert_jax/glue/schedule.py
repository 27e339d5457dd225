"""Runs fine-tuning jobs one after another on one device set, or in parallel, one per device set.

Parallel mode uses one thread per job: a job waits for the job it depends on (RTE waits for
MNLI), then takes a free device set, runs, and gives it back. JAX releases the GIL while
devices compute, so threads are enough and the jobs share one process and its caches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from typing import Any, Callable, Hashable, Optional, Sequence


class JobSkipped(RuntimeError):
    """A job not started because another job failed."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One (task, seed) run; depends_on names the job whose result it starts from."""

    key: Hashable
    depends_on: Optional[Hashable] = None


def run_jobs(jobs: Sequence[Job], device_sets: Sequence[Sequence[Any]],
             run: Callable[[Job, Sequence[Any], dict], Any]) -> dict:
    """Calls run(job, devices, results_so_far) for every job; returns {job.key: result}.

    With one device set, jobs run in the given order (which must list dependencies first).
    With several, up to len(device_sets) jobs run at once. The first error is re-raised.
    """
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"job keys must be unique; got {keys}")
    for position, job in enumerate(jobs):
        if job.depends_on is not None and job.depends_on not in keys[:position]:
            raise ValueError(f"job {job.key} depends on {job.depends_on}, which is not an "
                             f"earlier job; list dependencies first")
    if not device_sets:
        raise ValueError("no devices to run on")
    results: dict = {}
    if len(device_sets) == 1:
        for job in jobs:
            results[job.key] = run(job, device_sets[0], results)
        return results

    free: queue.Queue = queue.Queue()
    for devices in device_sets:
        free.put(devices)
    finished = {key: threading.Event() for key in keys}
    failed = threading.Event()

    def work(job: Job) -> None:
        try:
            if job.depends_on is not None:
                finished[job.depends_on].wait()
                if job.depends_on not in results:
                    raise JobSkipped(f"job {job.key} not run: {job.depends_on} failed")
            devices = free.get()
            try:
                if failed.is_set():
                    raise JobSkipped(f"job {job.key} not run: another job failed")
                results[job.key] = run(job, devices, results)
            finally:
                free.put(devices)
        except BaseException as error:
            if not isinstance(error, JobSkipped):
                failed.set()
            raise
        finally:
            finished[job.key].set()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(work, job) for job in jobs]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, JobSkipped)), errors[0])
    return results
