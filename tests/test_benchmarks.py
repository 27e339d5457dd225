"""The throughput benchmark runs for real on CPU (fake devices for the scaling mode), and the
profiler's kernel categories sort the kernel names an H100 trace contains."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_scaling_mode_times_one_device_then_both_meshes(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"),
         "--cases", "tiny:32:2", "--attention", "xla", "--steps", "1", "--scaling",
         "--no-torch", "--json", str(out)], env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mesh_name"], r["devices"]) for r in rows] == [
        ("1 device", 1), ("data parallel", 2), ("fsdp", 2)]
    assert rows[1]["mesh"]["data"] == 2 and rows[2]["mesh"]["fsdp"] == 2
    assert all(r["tokens_per_s_per_device"] > 0 for r in rows)
    assert "| tiny | 32 | 2 | xla | fsdp | 2 |" in result.stdout
    assert "scaling efficiency" in result.stdout


def test_profile_categories_sort_h100_kernel_names():
    from profile_step import category
    assert category("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT") == "matmul"
    assert category("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x256x32") == "matmul"
    assert category("alibi_flash_dkdv") == "attention (pallas/triton)"
    assert category("input_add_reduce_fusion_26") == "reduction fusion"
    assert category("loop_compare_convert_select_fusion") == "elementwise fusion"
    assert category("loop_slice_fusion_11") == "copy/transpose"


def test_benchmarks_time_the_trainers_step_on_the_trainers_batches():
    import jax
    from train_throughput import build_train_step, recipe_config

    from mosaicbert_jax.optim import recipe_optimizer

    config = recipe_config("tiny", 128, 2, "xla", {"data": 1, "fsdp": 1, "tensor": 1})
    assert config.optimizer.lr == 5e-4 and config.train.steps == 70_000  # configs/base.py
    step, state, batches, cfg, mesh = build_train_step(
        "tiny", 128, 2, "xla", {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    assert cfg.dtype.__name__ == "bfloat16" and cfg.vocab_size == 30528
    assert batches[0]["masked_positions"].shape == (2, 38)  # the real pipeline's K at 128
    schedule, _ = recipe_optimizer(config.optimizer, config.train.steps)
    for expected_step in range(2):
        state, metrics = step(state, batches[expected_step])
        # The recipe's warmup (6% of 70k steps): 0 at step 0, 5e-4 / 4200 at step 1.
        assert float(metrics["lr"]) == pytest.approx(float(schedule(expected_step)), rel=1e-3)
    assert int(state["step"]) == 2 and float(metrics["lr"]) > 0
