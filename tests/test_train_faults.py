"""Training faults: a diverging run stops before saving a non-finite state, and a bad override,
a different model, a finished workdir or too few steps are one clear line each."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mosaicbert_jax.checkpoint import load_pretrained, trained_seq_len
from mosaicbert_jax.cli_errors import UserError
from mosaicbert_jax.train import train_and_evaluate
from mosaicbert_jax.training.metrics_log import drop_rows_after

sys.path.insert(0, os.path.dirname(__file__))
from test_train import ROOT, cli_env, small_config  # noqa: E402

SMALL_OVERRIDES = ["--config.data.source=synthetic", "--config.data.seq_len=32",
                   "--config.model.vocab_size=256", "--config.train.global_batch_size=8",
                   "--config.train.eval_batches=1", "--config.train.async_checkpointing=False"]


def run_train(workdir, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "mosaicbert_jax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", *SMALL_OVERRIDES, *overrides],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)


def test_a_diverging_run_stops_and_every_checkpoint_it_left_is_finite(tmp_path):
    result = run_train(tmp_path, "--config.optimizer.lr=1e9", "--config.train.steps=8",
                       "--config.train.checkpoint_every=1", "--config.train.log_every=100",
                       "--config.train.eval_every=100", "--config.train.keep_checkpoints=3")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss or gradient norm at step "), last
    bad_step = int(last.split("at step ")[1].split()[0])
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps and max(steps) == bad_step - 1  # saved up to the last finite step, no further
    assert f"last good checkpoint, step {bad_step - 1}" in last
    for step in steps:
        params, _ = load_pretrained(str(tmp_path / "checkpoints" / str(step)))
        leaves = [np.asarray(x, np.float32) for x in _leaves(params)]
        assert all(np.isfinite(x).all() for x in leaves), step

    # The same workdir under another model: one line, exit 2, the checkpoints left as they are.
    other = run_train(tmp_path, "--config.model.preset=base", "--config.train.steps=8")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: --workdir={tmp_path} holds a checkpoint (step {max(steps)}) "
                           f"of a different model: preset=tiny (checkpoint) vs preset=base"), line
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == steps


def _leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)


def test_a_misspelled_override_is_one_line_naming_the_closest_key(tmp_path):
    result = run_train(tmp_path, "--config.train.stpes=10")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key --config.train.stpes; did you mean --config.train.steps?"]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_glue_misspelled_override_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mosaicbert_jax.glue", "--config=configs/glue.py",
         f"--config.workdir={tmp_path}", "--config.max_seq_lenn=64"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key --config.max_seq_lenn; did you mean --config.max_seq_len?"]


def _resumable_workdir(tmp_path):
    """A 4-step synthetic tiny run (checkpoints at 2 and 4), finished."""
    workdir = str(tmp_path / "wd")
    train_and_evaluate(small_config(steps=4, checkpoint_every=2, eval_every=4), workdir)
    return workdir


def test_resuming_under_another_model_names_what_differs(tmp_path, capsys):
    workdir = _resumable_workdir(tmp_path)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    config = small_config(steps=8)
    config.model.preset = "base"
    with pytest.raises(UserError) as error:
        train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "preset=tiny (checkpoint) vs preset=base (config)" in message
    assert "hidden_size 128 (checkpoint) vs 768 (config)" in message
    assert "--config.model.preset=tiny" in message and "new --workdir" in message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    load_pretrained(workdir)  # still a readable checkpoint


def test_a_finished_workdir_says_so_and_fewer_steps_is_an_error(tmp_path, capsys):
    workdir = _resumable_workdir(tmp_path)
    capsys.readouterr()
    again = train_and_evaluate(small_config(steps=4, checkpoint_every=2, eval_every=4), workdir)
    assert again["already_trained"] and again["steps"] == 4
    assert trained_seq_len(workdir) == 32  # what fill_mask warns against
    out = capsys.readouterr().out
    assert "already trained" in out and "raise --config.train.steps" in out
    assert "final_eval_loss=None" not in out
    with pytest.raises(UserError, match=r"checkpoint at step 4, past train.steps=2; set "
                                        r"--config.train.steps to at least 4"):
        train_and_evaluate(small_config(steps=2), workdir)


def test_raising_steps_says_what_the_learning_rate_does(tmp_path, capsys):
    from mosaicbert_jax.optim import recipe_optimizer

    workdir = _resumable_workdir(tmp_path)
    capsys.readouterr()
    config = small_config(steps=40, checkpoint_every=2, eval_every=100, log_every=100)
    train_and_evaluate(config, workdir, stop_after=5)
    out = capsys.readouterr().out
    old, _ = recipe_optimizer(config.optimizer, 4)
    new, _ = recipe_optimizer(config.optimizer, 40)
    before, after = float(old(3)), float(new(4))
    assert after > 3 * before  # the jump the note is about
    assert (f"train.steps 4 -> 40: the warmup and linear decay are recomputed over 40 steps, so "
            f"the learning rate goes from {before:.3g} (step 4) to {after:.3g} (step 5)") in out


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tmp_path):
    workdir = str(tmp_path / "wd")
    config = small_config(steps=6, log_every=1, checkpoint_every=3, eval_every=100)
    train_and_evaluate(config, workdir, stop_after=3)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "a") as f:  # a run killed after logging steps 4 and 5, before saving 6
        for step in (4, 5):
            f.write(json.dumps({"kind": "train", "step": step, "loss": 9.0}) + "\n")
        f.write('{"kind": "train", "st')  # and a line the kill cut short
    train_and_evaluate(config, workdir)
    records = [json.loads(line) for line in open(path)]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 9.0 for r in records)
    assert not [name for name in os.listdir(workdir) if ".tmp" in name]
    assert drop_rows_after(path, 6) == 0  # nothing past the last step: file left as is


def test_the_metrics_log_writes_tensorboard_events_without_importing_torch(tmp_path):
    """tensorboardX is imported with torch held off (2.5 s of every start where torch is
    installed); the events are written, and torch still imports afterwards."""
    code = ("import sys\n"
            "from mosaicbert_jax.training.metrics_log import MetricsLog\n"
            f"log = MetricsLog({str(tmp_path)!r})\n"
            "log.write('train', 3, {'loss': 2.5}); log.close()\n"
            "print('torch loaded:', 'torch' in sys.modules, type(log.writer).__name__)\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('torch'):\n"
            "    import torch; print('torch', torch.__version__ != '')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=cli_env(), cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch loaded: False SummaryWriter" in result.stdout
    if "torch True" not in result.stdout:
        assert "torch" not in result.stdout.split("SummaryWriter")[1]  # torch not installed
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5
