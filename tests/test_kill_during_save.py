"""kill -9 while a checkpoint is being written, then the same command again: it completes, from
the last complete checkpoint, and ends where an uninterrupted run ends (issue 18)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from mosaicbert_jax.checkpoint import load_pretrained

REPO = os.path.join(os.path.dirname(__file__), "..")
STEPS = 24
OVERRIDES = [
    "--config.data.source=synthetic", "--config.data.seq_len=32",
    "--config.data.synthetic_mean_doc_len=12", "--config.model.vocab_size=256",
    "--config.train.global_batch_size=8", f"--config.train.steps={STEPS}",
    "--config.train.log_every=4", "--config.train.eval_every=1000",
    "--config.train.eval_batches=1", "--config.train.checkpoint_every=1",
    "--config.train.keep_checkpoints=2", "--config.train.async_checkpointing=True",
]


def _command(workdir):
    return [sys.executable, "-m", "mosaicbert_jax.train", "--config=configs/tiny.py",
            f"--workdir={workdir}"] + OVERRIDES


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.abspath(REPO))


def _saving(checkpoints: str) -> bool:
    """A step directory that Orbax is still writing (its temporary name) exists."""
    try:
        return any(".orbax-checkpoint-tmp" in name for name in os.listdir(checkpoints))
    except FileNotFoundError:
        return False


def _final_params(workdir):
    params, _ = load_pretrained(str(workdir))
    return jax.tree_util.tree_leaves(params)


def test_kill_during_a_save_then_the_same_command_completes(tmp_path):
    full = subprocess.run(_command(tmp_path / "full"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    workdir = tmp_path / "killed"
    checkpoints = os.path.join(workdir, "checkpoints")
    proc = subprocess.Popen(_command(workdir), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, caught = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None:
        if _saving(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)):
            proc.send_signal(signal.SIGKILL)  # mid-save, after at least one complete step
            caught = True
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert caught, "the run ended before a save could be interrupted"
    assert proc.returncode == -signal.SIGKILL

    again = subprocess.run(_command(workdir), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step" in again.stdout + again.stderr
    assert str(STEPS) in sorted(os.listdir(checkpoints), key=lambda n: (len(n), n))[-1]
    for a, b in zip(_final_params(tmp_path / "full"), _final_params(workdir)):
        np.testing.assert_array_equal(a, b)
