"""Multi-host training with real processes on localhost, each with fake CPU devices, started as
the launch scripts start them (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID):
stop and resume, kill -9 and restart, another process count, and errors that end every process.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cpu_env import xla_flags
from mosaicbert_jax.checkpoint import load_pretrained
from mosaicbert_jax.data.synthetic import write_synthetic_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
# A tiny model on a small prepared corpus, a checkpoint every 3 steps, metrics every step.
RUN = ["--config=" + os.path.join(ROOT, "configs", "tiny.py"), "--config.data.source=shards",
       "--config.data.seq_len=32", "--config.train.global_batch_size=8",
       f"--config.train.steps={STEPS}", "--config.train.log_every=1",
       "--config.train.eval_every=6", "--config.train.eval_batches=1",
       "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2"]
COMPARED = ("loss", "accuracy", "lr", "grad_norm")  # not the timings
TIMEOUT_S = 240


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(workdir, processes, devices_per_process=1, args=(), shards=None, workdirs=None):
    """`processes` train commands joined through a coordinator on a free localhost port."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "SLURM_", "OMPI_")) and k != "XLA_FLAGS"
           or k == "JAX_COMPILATION_CACHE_DIR"}  # the session's cache (conftest.py)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
               MOSAICBERT_HEARTBEAT_TIMEOUT_S="15",
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices_per_process}"))
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                   JAX_NUM_PROCESSES=str(processes))
    data = [f"--config.data.shards_dir={shards}"] if shards else []
    procs = []
    for rank in range(processes):
        wd = workdirs[rank] if workdirs else workdir
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mosaicbert_jax.train", *RUN, *data, *args,
             f"--workdir={wd}"], env=dict(env, JAX_PROCESS_ID=str(rank)), cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, expect_ok=True):
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    if expect_ok:
        for p, (out, err) in zip(procs, outputs):
            assert p.returncode == 0, out[-2000:] + err[-4000:]
    return outputs


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def error_line(text):
    """The last line, without the 'process N: ' a process adds when it shows another one's
    error (with the same error everywhere, whichever process posts first is shown)."""
    return re.sub(r"^error: process \d+: ", "error: ", last_line(text))


def metrics(workdir):
    """{(kind, step): compared values}; a step logged twice (before a kill and after the
    restart) must have logged the same values both times."""
    records = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        r = json.loads(line)
        key, values = (r["kind"], r["step"]), {k: r[k] for k in COMPARED if k in r}
        assert records.setdefault(key, values) == values, (key, records[key], values)
        records[key] = values
    return records


def final_params(workdir):
    return load_pretrained(os.path.join(workdir, "checkpoints", str(STEPS)))[0]


def assert_same_params(a, b):
    import jax
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@contextlib.contextmanager
def made_once(tmp_path_factory, name):
    """(path, made) for a folder of the session's shared temp root, made under a file lock by
    the first pytest-xdist worker that asks (made: False) and reused by the others (True), so
    a 40 s two-process run that several tests compare against runs once per session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            path, done = root / name, root / f"{name}.done"
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)  # what a failed first try left
            yield str(path), done.exists()
            done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    with made_once(tmp_path_factory, "corpus") as (path, made):
        if not made:
            write_synthetic_shards(path, 40_000, vocab_size=256, seed=5, eval_tokens=4_000,
                                   shard_documents=60)
    return path


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    with made_once(tmp_path_factory, "uninterrupted") as (workdir, made):
        if not made:
            finish(start(workdir, 2, shards=shards))
    return workdir


def test_stop_and_resume_equals_the_uninterrupted_run(shards, uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    out = finish(start(workdir, 2, shards=shards, args=["--stop_after=9"]))
    assert "summary: steps=9" in out[0][0]
    out = finish(start(workdir, 2, shards=shards))
    assert "resumed from step 9" in out[0][0] and f"summary: steps={STEPS}" in out[0][0]
    assert metrics(workdir) == metrics(uninterrupted)
    assert_same_params(final_params(workdir), final_params(uninterrupted))


def test_kill_one_process_then_restart_resumes_from_the_last_complete_checkpoint(
        shards, uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    procs = start(workdir, 2, shards=shards)
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "6")):
        assert time.monotonic() < deadline and procs[1].poll() is None, "no checkpoint 6"
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    (out0, err0), _ = finish(procs, expect_ok=False)
    assert procs[1].returncode == -signal.SIGKILL
    if procs[0].returncode == 0:
        pytest.fail("the run finished before the kill landed; raise STEPS")
    # The survivor ends by itself: at its next collective (CPU collectives fail when a peer
    # is gone) with an error line, or, waiting in a barrier, at the heartbeat timeout.
    assert time.monotonic() - killed_at < 60 and procs[0].returncode != 0, err0[-3000:]
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                   if s.isdigit())
    out = finish(start(workdir, 2, shards=shards))
    assert f"resumed from step {steps[-1]}" in out[0][0], out[0][0][-2000:]
    assert metrics(workdir) == metrics(uninterrupted)
    assert_same_params(final_params(workdir), final_params(uninterrupted))


def test_another_process_count_resumes_and_a_changed_batch_fails_on_every_process(
        shards, tmp_path):
    workdir = str(tmp_path / "run")
    finish(start(workdir, 2, shards=shards, args=["--stop_after=3"]))
    began = time.monotonic()
    procs = start(workdir, 2, shards=shards, args=["--config.train.global_batch_size=4"])
    outputs = finish(procs, expect_ok=False)
    assert time.monotonic() - began < 60
    assert sorted(p.returncode for p in procs) in ([1, 2], [2, 2])  # 2: a user error
    for (_, err) in outputs:
        assert error_line(err) == (
            "error: saved data state has global_batch_size=8 but this iterator has "
            "global_batch_size=4; resume with the same data settings"), err[-3000:]
    # One process with both devices: the same global batches of tokens, the same mesh.
    out = finish(start(workdir, 1, devices_per_process=2, shards=shards))
    assert "resumed from step 3" in out[0][0] and f"summary: steps={STEPS}" in out[0][0]


def test_processes_that_see_different_workdirs_fail_at_once(shards, tmp_path):
    finish(start(str(tmp_path / "a"), 1, devices_per_process=2, shards=shards,
                 args=["--stop_after=3"]))
    outputs = finish(start(None, 2, shards=shards, workdirs=[tmp_path / "a", tmp_path / "b"]),
                     expect_ok=False)
    for (_, err) in outputs:
        line = error_line(err)
        assert line.startswith("error: the processes disagree on the checkpoint to resume "
                               "(process 0: step 3, process 1: none); --workdir="), err[-3000:]


def test_two_processes_give_the_one_process_loss_on_the_same_global_batch(tmp_path):
    synthetic = ["--config.data.source=synthetic", "--config.model.vocab_size=256",
                 "--config.data.synthetic_mean_doc_len=12", "--config.train.steps=3",
                 "--config.train.checkpoint_every=3"]
    finish(start(str(tmp_path / "one"), 1, devices_per_process=2, args=synthetic))
    finish(start(str(tmp_path / "two"), 2, devices_per_process=1, args=synthetic))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) and ("train", 3) in one
    for key in one:
        np.testing.assert_allclose(two[key]["loss"], one[key]["loss"], rtol=1e-5)
    assert one[("train", 1)]["loss"] != one[("train", 3)]["loss"]  # it did train


ONE_FAILS = """
import os, time
from mosaicbert_jax.cli_errors import UserError
from mosaicbert_jax.training import multihost
multihost.maybe_initialize_distributed("yes")
multihost.start_error_watcher()
try:
    if os.environ["JAX_PROCESS_ID"] == "1":
        raise UserError("process one cannot read its data")
    time.sleep(120)  # process 0 would wait here, as in a collective, for a long time
except UserError as error:
    multihost.exit_on_error(error)
"""


def test_an_error_in_one_process_ends_every_process_promptly():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_NUM_PROCESSES="2",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}")
    began = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", ONE_FAILS], cwd=ROOT, text=True,
                              env=dict(env, JAX_PROCESS_ID=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for rank in range(2)]
    outputs = finish(procs, expect_ok=False)
    assert time.monotonic() - began < 60
    assert [p.returncode for p in procs] == [1, 2]  # 2: a user error
    assert last_line(outputs[1][1]) == "error: process one cannot read its data"
    assert last_line(outputs[0][1]) == "error: process 1: process one cannot read its data"
    assert "Fatal Python error" not in outputs[0][1] + outputs[1][1]
