"""Multi-process runs: jax.distributed setup, checks that all processes agree, and ending every
process promptly, with the error shown, when one of them fails.

Left alone, a process that raises leaves the others waiting in a collective, and its own exit
waits in the distributed shutdown barrier until a timeout aborts everything with a coordination
service dump. Instead the failing process prints `error: ...`, posts the message in the
coordination service's key-value store and exits at once; a watcher thread in every process
reads it, prints it and exits too. Process 0 hosts the service, so it waits a few seconds for the
others to have read the error, and a moment longer for them to be gone, before it exits.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import NoReturn, Optional

import jax

from mosaicbert_jax.cli_errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, is_user_error

ERROR_KEY = "mosaicbert_jax/error"
SEEN_KEY = "mosaicbert_jax/error_seen/"
AGREE_KEY = "mosaicbert_jax/agree/"
EXIT_GRACE_S = 5.0  # how long process 0 keeps the service up for the others to read an error
# After the last "seen", how long process 0 still keeps the service up: a process that has
# posted "seen" is between that write and its os._exit, and if the service goes away in that
# window its JAX client aborts it (SIGABRT, gRPC lines after our error line). Seen on the
# 2-core CI machine under load; the exit itself takes microseconds when not descheduled.
EXIT_LINGER_S = 1.0
AGREE_TIMEOUT_S = 600.0
HEARTBEAT_ENV = "MOSAICBERT_HEARTBEAT_TIMEOUT_S"
_WATCH_POLL_MS = 1000  # short: a normal exit waits for the watcher's read to end

_watcher: Optional[threading.Thread] = None
_stop_watching = threading.Event()
_exiting = threading.Lock()  # held by whichever thread ends the process: one error line each


def maybe_initialize_distributed(mode: str) -> None:
    """jax.distributed.initialize() for multi-process launches (SLURM, TPU pods, env vars)."""
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.train.distributed={mode!r}; use auto, yes or no")
    if mode == "no" or coordination_client() is not None:
        return
    launched = any(int(os.environ.get(var, "1")) > 1 for var in
                   ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"))
    launched |= bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    launched |= "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if mode == "yes" or launched:
        # JAX reads JAX_COORDINATOR_ADDRESS itself, but not the process count and id.
        # A process killed outright is noticed after the heartbeat timeout (JAX's default 100 s);
        # MOSAICBERT_HEARTBEAT_TIMEOUT_S shortens it, e.g. in tests.
        heartbeat = _env_int(HEARTBEAT_ENV)
        options = {"heartbeat_timeout_seconds": heartbeat} if heartbeat else {}
        jax.distributed.initialize(num_processes=_env_int("JAX_NUM_PROCESSES"),
                                   process_id=_env_int("JAX_PROCESS_ID"), **options)


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "")
    return int(value) if value else None


def coordination_client():
    """The distributed runtime client (key-value store) of this process, None in a 1-process run.

    JAX has no public accessor; jax._src.distributed.global_state.client is what
    jax.experimental.multihost_utils uses, in JAX 0.10 and 0.11 alike."""
    from jax._src import distributed
    return distributed.global_state.client


def _process_id_and_count() -> tuple[int, int]:
    """From the distributed state, not jax.process_index(): that would initialise the backend,
    which waits for every process, so it must not run on a path where another one has failed."""
    from jax._src import distributed
    return distributed.global_state.process_id, distributed.global_state.num_processes


def check_same_on_every_process(what: str, value: str, hint: str) -> None:
    """Raises the same one-line ValueError on every process if `value` differs between them.

    Goes through the coordination service, not a device collective, so it is safe to call
    before anything is compiled; `what` must be unique within the run."""
    client = coordination_client()
    if client is None:
        return
    key = AGREE_KEY + what.replace(" ", "_") + "/"
    me, count = _process_id_and_count()
    client.key_value_set(key + str(me), value)
    values = [client.blocking_key_value_get(key + str(p), int(AGREE_TIMEOUT_S * 1000))
              for p in range(count)]
    if len(set(values)) > 1:
        seen = ", ".join(f"process {p}: {v}" for p, v in enumerate(values))
        raise ValueError(f"the processes disagree on {what} ({seen}); {hint}")


def start_error_watcher() -> None:
    """In a multi-process run: a daemon thread that ends this process when another one fails."""
    global _watcher
    client = coordination_client()
    if client is None or _watcher is not None:
        return
    _stop_watching.clear()
    _watcher = threading.Thread(target=_watch, args=(client,), name="error-watcher", daemon=True)
    _watcher.start()


def stop_error_watcher() -> None:
    """Before a normal exit: the distributed shutdown must not race the watcher's reads."""
    global _watcher
    _stop_watching.set()
    if _watcher is not None:
        _watcher.join(timeout=_WATCH_POLL_MS / 1000 + 2)
        _watcher = None


def _watch(client) -> None:
    while not _stop_watching.is_set():
        try:
            message = client.blocking_key_value_get(ERROR_KEY, _WATCH_POLL_MS)
        except Exception as error:  # nothing posted yet, or the service is going away
            if "DEADLINE_EXCEEDED" not in str(error):
                _stop_watching.wait(1.0)
            continue
        if _stop_watching.is_set():
            return
        _exit_everywhere(f"error: {message}", client, posted=True)


def one_line(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if is_user_error(error) else f"{type(error).__name__}: {text}"


def exit_on_error(error: BaseException) -> NoReturn:
    """Prints `error: ...` (after the traceback, unless it is a user error: see cli_errors)
    and exits with cli_errors' status (2 for a user error, 130 for Ctrl-C, else 1); in a
    multi-process run it ends the other processes too, and none of them waits in the
    distributed shutdown."""
    user = is_user_error(error)
    if not user and not isinstance(error, KeyboardInterrupt):
        traceback.print_exception(error)
    status = (EXIT_USER_ERROR if user else
              EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else 1)
    client = coordination_client()
    if client is None:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(status)
    _exit_everywhere(f"error: {one_line(error)}", client, posted=False, status=status)


def _exit_everywhere(line: str, client, posted: bool, status: int = 1) -> NoReturn:
    if not _exiting.acquire(blocking=False):
        while True:  # the other thread is already ending this process
            time.sleep(60)
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    me, count = _process_id_and_count()
    try:
        if not posted:
            try:  # the first error posted wins; the others still print their own
                client.key_value_set(ERROR_KEY, f"process {me}: {line[len('error: '):]}")
            except Exception:
                pass
        client.key_value_set(SEEN_KEY + str(me), "1")
        if me == 0:  # keep the service up until the others have read the error
            deadline = time.monotonic() + EXIT_GRACE_S
            for p in range(1, count):
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    break
                try:
                    client.blocking_key_value_get(SEEN_KEY + str(p), remaining_ms)
                except Exception:
                    pass
            if count > 1:
                time.sleep(EXIT_LINGER_S)
    finally:
        sys.stderr.flush()
        os._exit(status)  # skips the atexit distributed shutdown, whose barrier would wait
