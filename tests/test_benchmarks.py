"""The throughput benchmark runs for real on CPU (fake devices for the scaling mode), and the
profiler's kernel categories sort the kernel names an H100 trace contains."""

import json
import os
import re
import subprocess
import sys

import pytest

from cpu_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_scaling_mode_times_one_device_then_both_meshes(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
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


# ---------------------------------------------------------------- long-context scripts

TINY_MODERNBERT = json.dumps(dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
    vocab_size=1000, local_attention=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    cls_token_id=1, sep_token_id=2))


def _cpu_env():
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _save_tiny_params(directory, **config):
    import jax
    import numpy as np

    from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM
    from mosaicbert_jax.checkpoint import save_pretrained
    cfg = MosaicBertConfig.tiny(attention_implementation="xla", **config)
    ids = np.full((1, 16), 7, np.int32)
    params = MosaicBertForMaskedLM(cfg).init(jax.random.key(3), ids, np.ones_like(ids))["params"]
    save_pretrained(str(directory), params, cfg)
    return cfg, params


def test_long_context_speed_times_full_and_windowed_each_in_its_own_process(tmp_path):
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "long_context.py"), "speed",
         "--cases", "512:1", "--preset", "tiny", "--attention", "xla", "--steps", "1",
         "--window", "8", "--global-every", "2", "--no-peer", "--json", str(out)],
        env=_cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    ours = {r["variant"]: r for r in data["ours"]}
    assert set(ours) == {"full", "windowed"}
    assert (ours["windowed"]["window"], ours["windowed"]["global_every"]) == (8, 2)
    assert (ours["full"]["window"], ours["full"]["global_every"]) == (0, 0)
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] is None for r in ours.values())
    # GPU-hours from the real phase-2 configs: 7,000 steps x 1,024 rows x 512 tokens.
    first = data["phase2"][0]
    assert first["config"] == "configs/phase2_512.py" and first["tokens"] == 7000 * 1024 * 512
    assert first["gpu_hours"] == pytest.approx(
        first["tokens"] / ours["full"]["tokens_per_s"] / 3600, rel=1e-9)
    assert data["phase2"][1]["gpu_hours"] is None  # 1024 was not measured
    assert "| 512 x 1 |" in result.stdout and "configs/phase2_2048.py" in result.stdout
    # speed-report merges saved runs (cases split over two calls) into the same tables.
    from long_context import main
    merged = tmp_path / "merged.json"
    main(["speed-report", str(out), "--gpus", "4", "--json", str(merged)])
    again = json.loads(merged.read_text())
    assert again["phase2"][0]["gpu_hours"] == first["gpu_hours"]
    assert again["phase2"][0]["wall_hours_4_gpus"] == pytest.approx(first["gpu_hours"] / 4)
    assert (again["window"], again["global_every"]) == (8, 2)


def test_modernbert_peer_trains_a_tiny_config_eagerly_on_cpu():
    pytest.importorskip("transformers", reason="the ModernBERT peer is a benchmark-only "
                        "dependency (the GPU image has transformers)")
    from long_context import PEER_SNIPPET, run_child
    r = run_child([sys.executable, "-c", PEER_SNIPPET, "64", "2", "1", "0", "0", TINY_MODERNBERT],
                  300, "ModernBERT tiny")
    assert r is not None and r["tokens_per_s"] > 0 and not r["compiled"]
    assert r["params"] < 1_000_000  # the tiny override took effect (base has ~150M)
    assert 0 < r["loss"] < 12  # cross-entropy over 1,000 ids starts near ln(1000) = 6.9


def test_cut_masked_scores_the_same_tokens_at_every_length():
    import numpy as np
    import time_to_quality as ttq
    from long_context import cut_masked

    rows = np.random.default_rng(0).integers(5, 30522, (3, 1024)).astype(np.uint16)
    masked, _, _, _, dense = ttq.mask_rows(rows, 0.15, 5, slots=1024)
    assert (dense >= 0).sum() > 400  # 15% of 3,072 tokens, not cut down to 64 slots a row
    for length in (128, 256, 1024):
        ids, positions, weights, labels, _ = cut_masked(masked, dense, length)
        assert ids.shape == (3 * 1024 // length, length)
        got = {(p // (1024 // length), (p % (1024 // length)) * length + int(pos), int(lab))
               for p in range(len(ids)) for pos, lab, w in zip(positions[p], labels[p], weights[p])
               if w > 0}
        want = {(r, int(c), int(dense[r, c])) for r, c in zip(*np.nonzero(dense >= 0))}
        assert got == want  # the same (row, position, label) triples at every length
        assert np.array_equal(ids.reshape(3, 1024), masked)


def test_grouped_targets_keep_every_masked_token_and_refuse_an_overflow():
    import numpy as np
    import time_to_quality as ttq

    rows = np.random.default_rng().integers(5, 30522, (8, 128)).astype(np.uint16)
    _, _, _, _, dense = ttq.mask_rows(rows, 0.3, 7)
    for groups in (1, 4):
        positions, weights, labels = ttq.grouped_targets(dense, groups, 8 * 64 // groups)
        per_group = 8 // groups
        got = {(g * per_group + int(p) // 128, int(p) % 128, int(lab))
               for g in range(groups) for p, w, lab in zip(positions[g], weights[g], labels[g])
               if w > 0}
        want = {(r, int(c), int(dense[r, c])) for r, c in zip(*np.nonzero(dense >= 0))}
        assert got == want and weights.sum() == len(want)
        assert np.all(positions[weights == 0] == 0)
    with pytest.raises(ValueError, match="exceed its 10 slots; raise --jax-group-slots"):
        ttq.grouped_targets(dense, 1, 10)


def test_extrapolation_scores_one_mask_at_each_length_and_matches_a_direct_eval(tmp_path):
    import jax
    import numpy as np
    import optax
    import time_to_quality as ttq
    from long_context import main

    from mosaicbert_jax import MosaicBertForMaskedLM
    cfg, params = _save_tiny_params(tmp_path / "params")
    rows = np.random.default_rng(1).integers(5, 30522, (2, 1024)).astype(np.uint16)
    np.savez(tmp_path / "long.npz", eval=rows, train=rows[:, :512])
    out = tmp_path / "ex.json"
    main(["extrapolation", "--params", str(tmp_path / "params"), "--rows",
          str(tmp_path / "long.npz"), "--lengths", "256,1024", "--tokens-per-batch", "768",
          "--seed", "9", "--json", str(out)])
    table = {e["length"]: e for e in json.loads(out.read_text())["table"]}
    masked, _, _, _, dense = ttq.mask_rows(rows, 0.15, 9, slots=1024)
    assert table[256]["masked_tokens"] == table[1024]["masked_tokens"] == int((dense >= 0).sum())
    assert table[256]["pieces"] == 8  # 3 pieces a batch: the last batch padded, not dropped
    # The 1024 loss by hand: the model on whole rows, cross-entropy over the masked tokens.
    logits = MosaicBertForMaskedLM(cfg).apply({"params": params}, masked, np.ones_like(masked),
                                              deterministic=True)
    picked = dense >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(
        jax.numpy.asarray(logits)[picked], dense[picked])
    assert table[1024]["loss"] == pytest.approx(float(losses.mean()), rel=1e-4)


def test_window_loss_trains_full_and_windowed_on_the_same_rows(tmp_path):
    import numpy as np
    from long_context import main

    rng = np.random.default_rng(2)
    np.savez(tmp_path / "long.npz", eval=rng.integers(5, 30522, (2, 1024)).astype(np.uint16),
             train=rng.integers(5, 30522, (12, 512)).astype(np.uint16))
    out = tmp_path / "wl.json"
    main(["window-loss", "--rows", str(tmp_path / "long.npz"), "--preset", "tiny", "--batch", "4",
          "--steps", "2", "--window", "8", "--global-every", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    assert runs["windowed"]["config"] == {"attention_window": 8, "global_attention_every": 2}
    assert runs["full"]["config"] == {}
    for r in runs.values():
        assert [e["step"] for e in r["evals"]] == [0, 2]
        assert r["tokens_per_s"] == pytest.approx(2 * 4 * 512 / r["train_s"], rel=1e-9)
    assert data["train_rows"] == 12 and data["epochs"] == pytest.approx(8 / 12)


def test_time_to_quality_saves_the_final_params_it_evaluated(tmp_path):
    import jax
    import numpy as np
    import time_to_quality as ttq

    from mosaicbert_jax import MosaicBertForMaskedLM
    from mosaicbert_jax.checkpoint import load_pretrained
    from mosaicbert_jax.training.step import masked_lm_sums
    rows = np.random.default_rng(3).integers(5, 400, (40, 128)).astype(np.uint16)
    np.save(tmp_path / "rows.npy", rows)
    results = tmp_path / "ttq.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "time_to_quality.py"), "--rows",
         str(tmp_path / "rows.npy"), "--sides", "jax,jax-fp8", "--steps", "6", "--batch", "4",
         "--eval-every", "3", "--eval-rows", "8", "--lr", "0.02", "--jax-model", "preset=tiny",
         "--save-params", str(tmp_path / "saved"), "--out", str(results)],
        env=_cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    sides = json.loads(results.read_text())
    assert [r["side"] for r in sides] == ["jax", "jax-fp8"]  # a second side still runs
    evals = sides[0]["evals"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert evals[0]["loss"] - evals[-1]["loss"] > 0.3  # it trained: init params would not match
    params, cfg = load_pretrained(str(tmp_path / "saved"))
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (128, 2)
    model = MosaicBertForMaskedLM(cfg)
    sums = [jax.device_get(masked_lm_sums(
        model.apply({"params": params}, b[0], np.ones_like(b[0]), masked_positions=b[1],
                    deterministic=True), b[3], b[2]))
        for b in ttq.Rows(str(tmp_path / "rows.npy"), 4, 8).eval_batches]
    loss = sum(float(s["loss_sum"]) for s in sums) / sum(float(s["weight_sum"]) for s in sums)
    assert loss == pytest.approx(evals[-1]["loss"], abs=0.02)


def _word_level_tokenizer(path) -> str:
    """A real tokenizer file with the TTQ tokenizer's special ids ([CLS] 2, [SEP] 3) and 800
    made-up lowercase words, one id each, so the test needs nothing outside the repository."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = sorted({"".join(rng.choice(letters, int(rng.integers(4, 9)))) for _ in range(800)})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return str(path)


def test_make_long_rows_drops_a_ttq_overlapping_document_and_keeps_a_fresh_one(tmp_path):
    import numpy as np
    from make_long_rows import build, overlap_fraction, shingle_hashes
    from tokenizers import Tokenizer

    tokenizer_path = _word_level_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3)
    rng = np.random.default_rng(4)
    text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    fresh, seen = text(1500), text(1500)
    near_fresh = fresh[:len(fresh) // 2] + " " + text(40)  # shares half of the fresh document
    site = tmp_path / "site-packages" / "pkg"
    site.mkdir(parents=True)
    (site / "README.md").write_text(fresh)
    (site / "GUIDE.rst").write_text(seen)
    (site / "notes.txt").write_text(near_fresh)
    (site / "module.py").write_text(f'# comment\n"""{text(300)}"""\nimport os\n')
    (site / "other.py").write_text("import os\n" + f'"""{text(300)}"""\n')  # not a docstring
    # TTQ rows: the "seen" document, tokenized and cut into 128-token rows as the TTQ rows are.
    seen_ids = np.asarray([2] + tokenizer.encode(seen, add_special_tokens=False).ids + [3])
    ttq_rows = seen_ids[:len(seen_ids) // 128 * 128].reshape(-1, 128).astype(np.uint16)
    np.save(tmp_path / "rows.npy", ttq_rows)

    r = build([str(tmp_path / "site-packages")], tokenizer_path, str(tmp_path / "rows.npy"),
              eval_rows=1, min_train_rows=1)
    assert r["documents"] == 4  # three prose files and one module docstring
    assert (r["long_documents"], r["dropped_overlap"], r["fresh_documents"]) == (2, 1, 1)
    known = np.unique(shingle_hashes(ttq_rows).ravel())
    assert overlap_fraction(seen_ids, known) > 0.8  # only shingles across row cuts are unknown
    fresh_ids = np.asarray([2] + tokenizer.encode(fresh, add_special_tokens=False).ids + [3])
    assert overlap_fraction(fresh_ids, known) < 0.05
    assert r["eval"].shape == (1, 1024) and np.array_equal(r["eval"][0], fresh_ids[:1024])
    # Train rows: the seen document and the docstring stay, the near copy of eval text goes.
    assert r["dropped_near_eval"] == 1 and r["train_documents"] == 2
    assert not r["train_spans_documents"] and r["train"].shape[1] == 512
    eval_shingles = shingle_hashes(r["eval"]).ravel()
    assert not np.isin(shingle_hashes(r["train"]).ravel(), eval_shingles).any()


def test_fp8_gemm_probe_runs_each_formulation_in_a_child_and_checks_it(tmp_path):
    """On CPU the probe's three dense-layer formulations run for real in a child process; the
    bf16 one is within bf16 rounding of float32, the two FP8 ones carry FP8's larger error."""
    out = tmp_path / "probe.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "benchmarks"),
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "fp8_gemm_probe.py"), "--shapes",
         "128:64:32", "--iters", "1", "--flag-sets", "", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["gemm"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"bf16", "f8", "qdq"}
    assert max(rows["bf16"]["rel_errors"]) < 1e-2
    for gemm in ("f8", "qdq"):   # e4m3 / e5m2 rounding: a few percent, not bf16's 0.3%
        assert all(1e-2 < e < 0.2 for e in rows[gemm]["rel_errors"]), rows[gemm]
    assert all(r["fp8_gemms"] == 0 for r in rows.values())   # no cuBLAS on CPU


def test_fp8_gemm_probe_gemms_only_times_the_three_gemms_of_each_dtype(tmp_path):
    """--gemms-only runs the layer's three GEMMs on operands already in bf16 / float8 (CPU,
    in a child): both against float32, bf16 within its rounding, float8 with its larger
    error, and none of them needs a transpose (each operand comes contraction-major)."""
    out = tmp_path / "gemms.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "benchmarks"),
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "fp8_gemm_probe.py"), "--shapes",
         "128:64:32", "--iters", "1", "--flag-sets", "", "--gemms-only", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["gemm"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"bf16_gemms", "f8_gemms"}
    assert len(rows["bf16_gemms"]["rel_errors"]) == 3
    assert max(rows["bf16_gemms"]["rel_errors"]) < 1e-2
    assert all(1e-2 < e < 0.2 for e in rows["f8_gemms"]["rel_errors"]), rows["f8_gemms"]
    assert all(r["transposes"] == 0 for r in rows.values()), rows


def test_fp8_mlp_benchmark_checks_and_times_both_mlps():
    """benchmarks/fp8_mlp.py on CPU (small shapes, the XLA composition; the tile sweep and the
    ablation in the interpreter): its checks pass, its table has the bf16 and the FP8 rows, the
    sweep a row per tile, the ablation a row per kernel and output left out."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "benchmarks"),
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "fp8_mlp.py"), "--tokens", "128",
         "--hidden", "32", "--intermediate", "64", "--reps", "1", "--sweep", "--ablate"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fp8 mlp checks: all ok" in result.stdout
    assert result.stdout.count("-> ok") == 8 + 3   # the MLP at two rates, the QKV projection
    assert "| bf16 (x W_up" in result.stdout and "| fp8 mlp" in result.stdout
    assert "| bf16 (x W) |" in result.stdout and "| fp8 dense (fused/fp8_dense.py) |" in result.stdout
    import fp8_mlp
    assert result.stdout.count("| fp8 | glu_fp8_rows=") == len(fp8_mlp.SWEEP) == 8
    assert "| fp8 mlp, x and dy quantised by XLA" in result.stdout
    for kernel in ("forward", "backward"):
        for left_out in ("nothing", "amax", "transposed", "transposed+amax"):
            assert re.search(rf"\| {kernel} \(\d+, \d+, \d+\) \| {re.escape(left_out)} \| "
                             rf"\d+\.\d+ \|", result.stdout), (kernel, left_out)


def test_precision_overrides_reach_the_model_config_or_fail_in_one_line():
    from train_throughput import recipe_config, split_precision
    precision, overrides = split_precision("fp8+fp8_qkv_grad_in_attention=0")
    assert (precision, overrides) == ("fp8", {"fp8_qkv_grad_in_attention": False})
    config = recipe_config("tiny", 8, 16, "xla", {"data": 1, "fsdp": 1, "tensor": 1},
                           model_overrides=overrides)
    assert config.model.fp8_qkv_grad_in_attention is False
    precision, overrides = split_precision("bf16+mlm_loss_implementation=xla")
    assert (precision, overrides) == ("bf16", {"mlm_loss_implementation": "xla"})
    config = recipe_config("tiny", 8, 16, "xla", {"data": 1, "fsdp": 1, "tensor": 1},
                           fused="auto", model_overrides=overrides)
    assert config.model.mlm_loss_implementation == "xla"
    assert config.model.glu_implementation == "auto"
    with pytest.raises(ValueError, match="precision override 'fp8_qkv=0' is not field=int"):
        split_precision("fp8+fp8_qkv=0")
    # A MosaicBertConfig field the train config does not carry would be dropped unread.
    with pytest.raises(ValueError, match=r"model overrides \['num_hidden_layers'\] are not"):
        recipe_config("tiny", 8, 16, "xla", {"data": 1, "fsdp": 1, "tensor": 1},
                      model_overrides=split_precision("fp8+num_hidden_layers=3")[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_glu_gemm_probe_kernels_match_the_models_gemm_then_glu(dtype):
    """The probe's GEMM kernels with the GLU in their epilogues (Pallas interpreter, fresh
    random inputs, two tiles of a 64 x 64 x 2 x 64 MLP): float32 inputs give the model path's
    values within float32 rounding (the kernel's erf is within 1.5e-7); bf16 ones are within
    the probe's own bound of float32 (twice the model path's error plus a bf16 step). The GEMM
    without the GLU writes the same [a | b]."""
    import jax.numpy as jnp
    import numpy as np
    from glu_gemm_probe import (Tile, check, draw, float32_reference, fused_down_grad, fused_up,
                                max_error, model_down_grad, model_up)
    dt = getattr(jnp, dtype)
    seed_value = int(np.random.SeedSequence().entropy % 2 ** 32)
    x, w_up, dy, w_down, seed = draw(np.random.default_rng(seed_value), 64, 64, 64, dt)
    ab_m, h_m = model_up(x, w_up, seed, glu_impl="xla")
    model_out = (ab_m, h_m, model_down_grad(dy, w_down, ab_m, seed, glu_impl="xla"))
    for tile in (Tile(32, 16, 16, 4, 1), Tile(16, 32, 32, 4, 1)):
        ab, h = fused_up(x, w_up, seed, tile, interpret=True)
        fused_out = (ab, h, fused_down_grad(dy, w_down, ab, seed, tile, interpret=True))
        assert np.array_equal(np.asarray(fused_up(x, w_up, seed, tile, glu=False,
                                                  interpret=True)[0]), np.asarray(ab))
        assert float(jnp.mean(h == 0)) > 0.05   # the dropout mask is applied (rate 0.1)
        if dtype == "float32":
            for got, want in zip(fused_out, model_out):
                scale = float(jnp.max(jnp.abs(want)))
                assert max_error(got, want) <= 1e-5 * scale, (tile, seed_value)
        else:
            check(fused_out, model_out, float32_reference(x, w_up, dy, w_down, seed),
                  f"{tile} seed {seed_value}")


def test_fused_ops_variants_name_one_op_and_one_direction():
    """fused_ops.py --variants: each override times in the op its fields name, forward or
    backward by the _bwd suffix; mixed, float8 or unknown fields are one-line errors."""
    from fused_ops import variant_fields
    assert variant_fields("ln_rows_bwd=2,ln_deferred_sums_bwd=1") == (
        "layernorm", "bwd", {"ln_rows_bwd": 2, "ln_deferred_sums_bwd": 1})
    assert variant_fields("glu_rows=16,glu_cols=128") == (
        "glu", "fwd", {"glu_rows": 16, "glu_cols": 128})
    for bad in ("ln_rows=2,ln_rows_bwd=2", "glu_rows=8,ln_rows=4", "glu_fp8_rows=16",
                "quantize_rows=8"):
        with pytest.raises(ValueError, match="give the fields of one op"):
            variant_fields(bad)
    with pytest.raises(ValueError, match="ln_rows=3 must be a power of two"):
        variant_fields("ln_rows=3")


def test_fp8_gemm_scale_probe_forms_give_the_per_gemm_products_values():
    """fp8_gemm_scale_probe.py: the vector form of the GEMM output scales (fp8.model_stats')
    and the float32-output form give the per-GEMM products' outputs within bf16 rounding
    (fresh random operands and scales, the quantising kernel in the interpreter; on the GPU
    the probe itself compares bits; on CPU the programs may fuse a bf16 rounding away), and
    those are x @ w^T within FP8 rounding; kernel_counts reads the compiled entry computation."""
    import jax
    import numpy as np
    from fp8_gemm_scale_probe import SCALE_FORMS, draw, kernel_counts, scaled_gemms
    scale, xs, ws = draw(3, 32, np.random.default_rng())
    outs = {form: [np.asarray(y, np.float32) for y in scaled_gemms(form, scale, xs, ws, True)]
            for form in SCALE_FORMS}
    for form in ("vector", "vector_f32_out"):
        for a, b in zip(outs[form], outs["per_gemm"]):
            assert np.abs(b).max() > 0
            np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-6 * np.abs(b).max())
    for k, (x, w) in enumerate(zip(xs, ws)):  # and each is x @ w^T within FP8 rounding
        exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
        error = np.linalg.norm(outs["per_gemm"][k] - exact) / np.linalg.norm(exact)
        assert 1e-3 < error < 0.1, (k, error)
    hlo = jax.jit(lambda s, x, w: scaled_gemms("vector", s, x, w, True)).lower(
        scale, xs, ws).compile().as_text()
    counts = kernel_counts(hlo)
    assert counts["f8_gemm"] == 0 and sum(counts.values()) > 0  # no cuBLAS on CPU
    with pytest.raises(ValueError, match="not one of"):
        scaled_gemms("rowwise", scale, xs, ws, True)


@pytest.mark.parametrize("script", ["glu_gemm_probe.py", "check_mlm_loss.py",
                                    "check_fp8_attention.py", "fp8_gemm_scale_probe.py"])
def test_gpu_only_checks_refuse_a_cpu_backend_in_one_line(script):
    """The GPU kernel checks on a CPU-only machine: exit 2 with a one-line usage error that
    names the backend, no traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")]),
        JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "JAX backend is cpu" in result.stderr and "Traceback" not in result.stderr
