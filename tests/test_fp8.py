"""FP8 GEMMs with delayed scaling: qdq error bounds, the scaling rule, the stats a real train step
writes (checked against amaxes recomputed independently), microbatch combination, exact resume
through real Orbax checkpoints, and fp8 off leaving everything as it was."""

import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM, fp8
from mosaicbert_jax.cli_errors import UserError
from mosaicbert_jax.data.synthetic import SyntheticMLMBatches
from mosaicbert_jax.model import MosaicBertEmbeddings
from mosaicbert_jax.optim import decoupled_adamw, warmup_linear_decay
from mosaicbert_jax.sharding import batch_sharding, make_mesh
from mosaicbert_jax.train import model_config_from, train_and_evaluate
from mosaicbert_jax.training.resume import TrainCheckpoints
from mosaicbert_jax.training.resume_checks import check_same_fp8
from mosaicbert_jax.training.step import (fp8_stat_rows, init_state, make_train_step,
                                          masked_lm_sums)

sys.path.insert(0, os.path.dirname(__file__))
from test_train import small_config  # noqa: E402

VOCAB = 256
LAYER0 = ("bert", "encoder", "layer_0")
WQKV = LAYER0 + ("attention_self", "Wqkv")


def tiny(**overrides):
    return MosaicBertConfig.tiny(vocab_size=VOCAB, hidden_dropout_prob=0.0, **overrides)


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def stats_of(model, state):
    """The per-module STATS tree of a train state's stacked FP8 stats."""
    return fp8.unstack_stats(jax.device_get(state["fp8"]), fp8_stat_rows(model))


@pytest.fixture(scope="module")
def setup():
    """A tiny FP8 model's fresh state, its compiled train step and one batch."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model = MosaicBertForMaskedLM(tiny(fp8=True, fp8_gemm="f8"))
    schedule = warmup_linear_decay(1e-3, 10)
    tx = decoupled_adamw(schedule, 1e-3)
    state, shardings = init_state(model, tx, 0, mesh)
    step = make_train_step(model, tx, schedule, mesh, shardings)
    batch = jax.device_put(next(SyntheticMLMBatches(8, 32, VOCAB, seed=3, mean_doc_len=12)),
                           batch_sharding(mesh))
    new_state, metrics = step(jax.tree_util.tree_map(jnp.copy, state), batch)
    return dict(mesh=mesh, model=model, tx=tx, schedule=schedule, state=state,
                shardings=shardings, step=step, batch=batch, new_state=new_state,
                metrics=metrics)


def copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


@pytest.mark.parametrize("dtype, mantissa_bits", [(jnp.float8_e4m3fn, 3),
                                                  (jnp.float8_e5m2, 2)])
def test_qdq_round_trip_error_within_half_an_fp8_ulp(dtype, mantissa_bits):
    scale = jnp.float32(0.25)
    limit = fp8.fp8_max(dtype) * 0.25
    x = jax.random.uniform(jax.random.key(0), (4096,), jnp.float32, -limit, limit)
    x = x[jnp.abs(x) > 1.0]  # normal numbers of the fp8 grid at this scale
    y = fp8.quantize_dequantize(x, dtype, scale)
    relative = np.abs(np.asarray(y - x)) / np.abs(np.asarray(x))
    half_ulp = 2.0 ** -(mantissa_bits + 1)
    assert relative.max() <= half_ulp * 1.001
    assert relative.max() > half_ulp / 2  # it did round to the coarse grid
    # Beyond fmax * scale it clips to exactly that, and values are scale multiples of fp8 ones.
    big = fp8.quantize_dequantize(jnp.array([3 * limit, -3 * limit]), dtype, scale)
    np.testing.assert_array_equal(big, [limit, -limit])
    np.testing.assert_array_equal((y / scale).astype(dtype).astype(jnp.float32), y / scale)


def test_delayed_scaling_rolls_the_history_and_scales_from_its_max():
    history = jnp.array([1.0, 4.0, 2.0, 0.0])
    rolled = fp8.roll_history(history, jnp.float32(3.0))
    np.testing.assert_array_equal(rolled, [3.0, 1.0, 4.0, 2.0])
    old = jnp.float32(0.5)
    scale = fp8.scale_from_history(rolled, old, jnp.float8_e4m3fn)
    np.testing.assert_allclose(scale, 4.0 / 448.0, rtol=1e-6)
    # Two more rolls drop the 4: the scale follows the new max (the 3).
    twice = fp8.roll_history(fp8.roll_history(rolled, jnp.float32(0.5)), jnp.float32(0.5))
    np.testing.assert_array_equal(twice, [0.5, 0.5, 3.0, 1.0])
    scale = fp8.scale_from_history(twice, old, jnp.float8_e4m3fn)
    np.testing.assert_allclose(scale, 3.0 / 448.0, rtol=1e-6)
    np.testing.assert_allclose(fp8.scale_from_history(rolled, old, jnp.float8_e5m2),
                               4.0 / 57344.0, rtol=1e-6)
    # Guards: an all-zero or non-finite history keeps the old scale; a NaN amax records 0.
    assert float(fp8.scale_from_history(jnp.zeros(4), old, jnp.float8_e4m3fn)) == 0.5
    assert float(fp8.scale_from_history(jnp.array([jnp.inf, 1.0]), old,
                                        jnp.float8_e4m3fn)) == 0.5
    np.testing.assert_array_equal(fp8.roll_history(history, jnp.float32(jnp.nan)),
                                  [0.0, 1.0, 4.0, 2.0])


def test_stacked_stats_update_each_row_as_its_own_tensor():
    """The train state's stacked stats: stack/unstack round-trip a STATS tree, and one batched
    update gives, row by row, exactly the per-tensor roll and rescale (fmax per row's dtype;
    a NaN amax recorded as 0; an all-zero history keeps its scale)."""
    rng = np.random.default_rng()
    tree = {"b": {"c": {"kernel_scale": jnp.float32(0.5),
                        "kernel_amax_history": jnp.zeros(4, jnp.float32)}},
            "a": {f"{t}_{v}": (jnp.float32(rng.uniform(0.1, 1)) if v == "scale" else
                               jnp.asarray(rng.uniform(0.5, 8, 4), jnp.float32))
                  for t in ("input", "output_grad") for v in ("scale", "amax_history")}}
    rows = fp8.stat_rows(tree)
    assert rows == (("a", "input"), ("a", "output_grad"), ("b", "c", "kernel"))
    stacked = fp8.stack_stats(tree, rows)
    assert stacked["amax_history"].shape == (3, 4)
    back = fp8.unstack_stats(stacked, rows)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(a, b)
    seen = jnp.asarray([rng.uniform(9, 20), np.nan, 0.0], jnp.float32)
    new = jax.jit(lambda s, a: fp8.updated_stacked(s, a, rows))(stacked, seen)
    for i, row in enumerate(rows):
        group = fp8._group(tree, row)
        history = fp8.roll_history(group[f"{row[-1]}_amax_history"], seen[i])
        dtype = fp8.BACKWARD_DTYPE if row[-1] == "output_grad" else fp8.FORWARD_DTYPE
        scale = fp8.scale_from_history(history, group[f"{row[-1]}_scale"], dtype)
        np.testing.assert_array_equal(new["amax_history"][i], history)
        # (1 ulp apart at most: XLA may turn the division by fmax into a multiplication)
        np.testing.assert_allclose(new["scale"][i], scale, rtol=3e-7)
    np.testing.assert_allclose(new["scale"][0], seen[0] / 448.0, rtol=1e-6)
    assert float(new["amax_history"][1, 0]) == 0.0 and float(new["scale"][2]) == 0.5
    # The tree form (tests, calibration) is the same update.
    seen_tree = fp8.unstack_stats({"scale": seen, "amax_history": stacked["amax_history"]}, rows)
    for a, b in zip(jax.tree_util.tree_leaves(fp8.updated_stats(tree, seen_tree)),
                    jax.tree_util.tree_leaves(fp8.unstack_stats(new, rows))):
        np.testing.assert_allclose(a, b, rtol=3e-7)


def _stats(scale):
    return (jnp.float32(scale), jnp.zeros(4, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_matmul_forward_and_gradients_are_the_float8_products(dtype):
    """fp8_matmul's value and both gradients against GEMMs of the same float8 operands done
    in float32 here, on fresh random inputs; a wrong transpose, scale or e4m3/e5m2 swap in the
    custom VJP is off by O(1), the float32-vs-float8-accumulation difference by ~1e-6."""
    kx, kw, kg = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    x = (jax.random.normal(kx, (3, 40, 48)) * 3).astype(dtype)
    w = (jax.random.normal(kw, (48, 32)) * 0.05).astype(dtype)
    g = (jax.random.normal(kg, (3, 40, 32)) * 1e-3).astype(dtype)
    sx, sw, sg = 12.0 / 448, 0.2 / 448, 4e-3 / 57344   # scales near each tensor's amax / fmax
    y, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(dtype, a, b, _stats(sx), _stats(sw),
                                                 _stats(sg)), x, w)
    dx, dw = vjp(g)
    f32 = lambda q: np.asarray(q.astype(jnp.float32), np.float64)
    qx = f32(fp8.quantize(x, fp8.FORWARD_DTYPE, jnp.float32(sx))).reshape(-1, 48)
    qw = f32(fp8.quantize(w, fp8.FORWARD_DTYPE, jnp.float32(sw)))
    qg = f32(fp8.quantize(g, fp8.BACKWARD_DTYPE, jnp.float32(sg))).reshape(-1, 32)
    for got, want in ((y, (qx @ qw) * sx * sw), (dx, (qg @ qw.T) * sg * sw),
                      (dw, (qx.T @ qg) * sx * sg)):
        assert got.dtype == dtype
        got = np.asarray(got.astype(jnp.float32), np.float64).reshape(want.shape)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < (1e-2 if dtype == jnp.bfloat16 else 1e-5), rel
    # And the float8 rounding is really there: against the exact float32 product it is ~1e-2.
    exact = np.asarray(x, np.float64).reshape(-1, 48) @ np.asarray(w, np.float64)
    rel = np.linalg.norm(np.asarray(y, np.float64).reshape(exact.shape) - exact) / \
        np.linalg.norm(exact)
    assert 1e-3 < rel < 5e-2, rel


def test_fp8_gemm_modes_quantize_alike_in_a_model(setup):
    """The "f8" and "qdq" ways compute the same quantised model (they differ only by where the
    bf16/f32 rounding of the dequantised products falls), and both write the same stats."""
    batch, params = setup["batch"], setup["state"]["params"]
    variables = {"params": params, fp8.STATS: stats_of(setup["model"], setup["state"])}
    stats = _stats_after_one_pass(setup["model"], variables, batch)
    logits = {}
    for gemm in ("f8", "qdq"):
        model = MosaicBertForMaskedLM(tiny(fp8=True, fp8_gemm=gemm))
        logits[gemm] = _centred_logits(model, {"params": params, fp8.STATS: stats}, batch)
        again = _stats_after_one_pass(model, variables, batch)
        for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(again)):
            np.testing.assert_allclose(a, b, rtol=1e-5)
    exact = _centred_logits(MosaicBertForMaskedLM(tiny()), {"params": params}, batch)
    between = np.linalg.norm(logits["f8"] - logits["qdq"])
    assert between < 0.05 * np.linalg.norm(logits["f8"] - exact), between


def test_config_rejects_bad_fp8_values():
    with pytest.raises(ValueError, match="fp8_gemm='fp16' must be one of 'f8', 'qdq', 'mlp'"):
        tiny(fp8=True, fp8_gemm="fp16")
    with pytest.raises(ValueError, match="fp8_gemm='mlp' drops .* dropout_rng='threefry'"):
        tiny(fp8=True, fp8_gemm="mlp", dropout_rng="threefry")

    with pytest.raises(ValueError, match="fp8='True' must be True or False"):
        tiny(fp8="True")
    with pytest.raises(ValueError, match="fp8_amax_history=0 must be an int >= 1"):
        tiny(fp8=True, fp8_amax_history=0)


def _stats_after_one_pass(model, variables, batch):
    """The stats' "gradients" of one loss pass: the stats calibrated to this batch."""
    def loss(params, stats):
        logits = model.apply({"params": params, fp8.STATS: stats}, batch["input_ids"],
                             batch["segment_ids"], masked_positions=batch["masked_positions"])
        return masked_lm_sums(logits, batch["masked_labels"], batch["masked_weights"])["loss_sum"]
    _, stats = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"],
                                                        variables[fp8.STATS])
    return fp8.updated_stats(variables[fp8.STATS], stats)


def _centred_logits(model, variables, batch):
    """The MLM logits minus their mean over the vocabulary (what the softmax sees)."""
    @jax.jit
    def logits(variables):
        out = model.apply(variables, batch["input_ids"], batch["segment_ids"],
                          masked_positions=batch["masked_positions"])
        return out - out.mean(-1, keepdims=True)
    return np.asarray(logits(variables))


def test_fp8_logits_are_close_to_but_not_the_full_precision_logits(setup):
    batch, model = setup["batch"], setup["model"]
    params = setup["state"]["params"]
    exact = _centred_logits(MosaicBertForMaskedLM(tiny()), {"params": params}, batch)
    stats = _stats_after_one_pass(model, {"params": params,
                                          fp8.STATS: stats_of(model, setup["state"])}, batch)
    quantized = _centred_logits(model, {"params": params, fp8.STATS: stats}, batch)
    error = np.linalg.norm(quantized - exact) / np.linalg.norm(exact)
    # e4m3 rounds each operand by <= 2**-4 relative, independently per element, so a K-term
    # dot is off by about 2**-4 / sqrt(3 K) ~ 0.3% for K = 128 (measured: 0.26%). Float32
    # rounding alone gives ~1e-6; a qdq that did not run gives that, wrong scales give > 2%.
    assert 5e-4 < error < 2e-2, error
    # Without its stats (fine-tuning, fill-mask) the FP8 model computes the plain dots.
    np.testing.assert_array_equal(_centred_logits(model, {"params": params}, batch), exact)


def test_train_step_writes_the_true_amaxes_of_the_tensors(setup):
    model, state, batch, new_state = (setup["model"], setup["state"], setup["batch"],
                                      setup["new_state"])
    stats = at(stats_of(model, new_state), WQKV + ("Fp8DotGeneral_0",))
    old = at(stats_of(model, state), WQKV + ("Fp8DotGeneral_0",))
    variables = {"params": state["params"], fp8.STATS: stats_of(model, state)}
    # Recomputed independently: Wqkv's input is the embeddings' output; its kernel the params.
    _, captured = jax.jit(lambda v: model.apply(
        v, batch["input_ids"], batch["segment_ids"], masked_positions=batch["masked_positions"],
        capture_intermediates=lambda m, _: isinstance(m, MosaicBertEmbeddings)))(variables)
    embedded = captured["intermediates"]["bert"]["embeddings"]["__call__"][0]
    kernel = at(state["params"], WQKV + ("kernel",))
    # The output gradient: the loss' cotangent at Wqkv's output, taken by adding a zero there.
    delta = jnp.zeros(batch["input_ids"].shape + (3 * model.config.hidden_size,))

    def add_delta(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (isinstance(context.module, fp8.Fp8DotGeneral)
                and context.module.scope.path[:len(WQKV)] == WQKV):
            return out + delta.astype(out.dtype)
        return out

    def loss(d):
        nonlocal delta
        delta = d
        with nn.intercept_methods(add_delta):
            logits = model.apply(variables, batch["input_ids"], batch["segment_ids"],
                                 masked_positions=batch["masked_positions"])
        return masked_lm_sums(logits, batch["masked_labels"], batch["masked_weights"])["loss_sum"]

    cotangent = jax.jit(jax.grad(loss))(delta)
    for tensor, value in (("input", embedded), ("kernel", kernel), ("output_grad", cotangent)):
        history = np.asarray(stats[f"{tensor}_amax_history"])
        true_amax = float(jnp.max(jnp.abs(value)))
        assert true_amax > 0
        np.testing.assert_allclose(history[0], true_amax, rtol=1e-5, err_msg=tensor)
        np.testing.assert_array_equal(history[1:], np.asarray(
            old[f"{tensor}_amax_history"])[:-1])  # the rest rolled by one
        fmax = fp8.fp8_max(fp8.BACKWARD_DTYPE if tensor == "output_grad"
                           else fp8.FORWARD_DTYPE)
        np.testing.assert_allclose(stats[f"{tensor}_scale"], true_amax / fmax, rtol=1e-5)
    # Every FP8 dot of the model got an output gradient from the backward.
    new_stats = stats_of(model, new_state)
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(new_stats)[0]:
        if "output_grad_amax_history" in jax.tree_util.keystr(leaf_path):
            assert float(leaf[0]) > 0, jax.tree_util.keystr(leaf_path)
    # The stacked state holds exactly these rows: one per (dense layer, tensor).
    rows = fp8_stat_rows(model)
    assert len(rows) == 3 * 4 * model.config.num_hidden_layers
    assert new_state["fp8"]["amax_history"].shape == (len(rows), model.config.fp8_amax_history)


def test_two_microbatches_give_the_max_combined_stats_of_one_batch(setup):
    step2 = make_train_step(setup["model"], setup["tx"], setup["schedule"], setup["mesh"],
                            setup["shardings"], microbatches=2)
    accumulated, _ = step2(copy(setup["state"]), setup["batch"])
    one, two = stats_of(setup["model"], setup["new_state"]), stats_of(setup["model"], accumulated)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one)[0],
                            jax.tree_util.tree_leaves(two)):
        # A summed combination would double each amax; a max gives the full batch's.
        np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_a_nonfinite_step_keeps_the_old_fp8_stats(setup):
    state = copy(setup["state"])
    kernel = at(state["params"], LAYER0 + ("mlp", "wo", "kernel"))
    at(state["params"], LAYER0 + ("mlp", "wo"))["kernel"] = kernel.at[0, 0].set(jnp.nan)
    kept, metrics = setup["step"](copy(state), setup["batch"])
    assert float(metrics["finite"]) == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(state["fp8"]),
                    jax.tree_util.tree_leaves(kept["fp8"])):
        np.testing.assert_array_equal(a, b)


def test_fp8_off_has_no_stats_and_the_same_params_as_fp8_on():
    ids = jnp.ones((1, 8), jnp.int32)
    off = jax.eval_shape(lambda: MosaicBertForMaskedLM(tiny()).init(jax.random.key(0), ids, ids))
    on = jax.eval_shape(lambda: MosaicBertForMaskedLM(tiny(fp8=True, fp8_gemm="f8")).init(
        jax.random.key(0), ids, ids))
    assert set(off) == {"params"} and set(on) == {"params", fp8.STATS}
    assert jax.tree_util.tree_structure(off["params"]) == jax.tree_util.tree_structure(
        on["params"])
    # The fused-LayerNorm path (DenseBiasApart) keeps stats for its dense layers too.
    fused = jax.eval_shape(lambda: MosaicBertForMaskedLM(tiny(
        fp8=True, fp8_gemm="f8", layernorm_implementation="pallas_interpret")).init(jax.random.key(0), ids,
                                                                    ids))
    assert jax.tree_util.tree_structure(fused[fp8.STATS]) == jax.tree_util.tree_structure(
        on[fp8.STATS])
    assert set(at(on[fp8.STATS], LAYER0)) == {"attention_self", "attention_output", "mlp"}
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx = decoupled_adamw(warmup_linear_decay(1e-3, 10), 1e-3)
    state = jax.eval_shape(lambda: init_state(MosaicBertForMaskedLM(tiny()), tx, 0, mesh)[0])
    assert set(state) == {"step", "params", "opt_state"}


def fp8_config(gemm="f8", **train):
    config = small_config(**train)
    config.model.fp8 = True
    config.model.fp8_gemm = gemm
    config.model.hidden_dropout_prob = 0.0
    config.train.steps = 4
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    return config


def test_resume_with_fp8_is_exact_and_refuses_a_changed_fp8_setting(tmp_path):
    whole = train_and_evaluate(fp8_config(), str(tmp_path / "whole"))
    first = train_and_evaluate(fp8_config(), str(tmp_path / "split"), stop_after=2)
    assert first["steps"] == 2
    model = MosaicBertForMaskedLM(model_config_from(fp8_config(), VOCAB))
    history = at(stats_of(model, first["state"]), WQKV + ("Fp8DotGeneral_0",
                                                          "input_amax_history"))
    assert float(history[1]) > 0 and float(history[2]) == 0  # two steps rolled in
    resumed = train_and_evaluate(fp8_config(), str(tmp_path / "split"))
    assert resumed["resumed_from"] == 2
    for key in ("params", "fp8"):
        whole_leaves = jax.tree_util.tree_leaves(jax.device_get(whole["state"][key]))
        resumed_leaves = jax.tree_util.tree_leaves(jax.device_get(resumed["state"][key]))
        assert len(whole_leaves) == len(resumed_leaves)
        for a, b in zip(whole_leaves, resumed_leaves):
            np.testing.assert_array_equal(a, b)
    off = fp8_config(steps=6)
    off.model.fp8 = False
    with pytest.raises(UserError, match=r"trained with fp8=True.*--config\.model\.fp8=True"):
        train_and_evaluate(off, str(tmp_path / "split"))


def test_a_checkpoint_of_per_tensor_fp8_stats_resumes_exactly(tmp_path):
    """Checkpoints written before the stats were stacked (one leaf per tensor) resume, stacked
    on the fly, to the same bits as an uninterrupted run."""
    whole = train_and_evaluate(fp8_config(), str(tmp_path / "whole"))
    train_and_evaluate(fp8_config(), str(tmp_path / "split"), stop_after=2)
    item = tmp_path / "split" / "checkpoints" / "2" / "state"
    saved = ocp.PyTreeCheckpointer().restore(str(item))
    rows = fp8_stat_rows(MosaicBertForMaskedLM(model_config_from(fp8_config(), VOCAB)))
    saved["fp8"] = jax.tree_util.tree_map(np.asarray, fp8.unstack_stats(saved["fp8"], rows))
    shutil.rmtree(item)
    ocp.PyTreeCheckpointer().save(str(item), saved)
    for workdir, step, per_tensor in (("split", 2, True), ("whole", 4, False)):
        checkpoints = TrainCheckpoints(str(tmp_path / workdir), async_save=False)
        assert checkpoints.saved_fp8_per_tensor(step) == per_tensor
        checkpoints.close()
    resumed = train_and_evaluate(fp8_config(), str(tmp_path / "split"))
    assert resumed["resumed_from"] == 2
    assert set(resumed["state"]["fp8"]) == {"scale", "amax_history"}
    for key in ("params", "fp8"):
        for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(whole["state"][key])),
                        jax.tree_util.tree_leaves(jax.device_get(resumed["state"][key]))):
            np.testing.assert_array_equal(a, b)


def test_bf16_fp8_dot_lowers_and_compiles_with_both_fp8_types():
    dense = nn.Dense(64, dtype=jnp.bfloat16, dot_general_cls=fp8.dot_general_cls(True, 16))
    x = jnp.ones((4, 32), jnp.bfloat16)
    variables = dense.init(jax.random.key(0), x)

    def loss(params, stats):
        out = dense.apply({"params": params, fp8.STATS: stats}, x)
        return out.astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables["params"],
                                                             variables[fp8.STATS])
    text = lowered.as_text()
    assert "f8E4M3FN" in text and "f8E5M2" in text
    compiled = lowered.compile().as_text()
    assert "f8e4m3fn" in compiled and "f8e5m2" in compiled


def test_profile_step_counts_the_fp8_gemm_custom_calls():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from profile_step import gemm_custom_calls
    hlo = ('%a = custom-call(f8e4m3fn[8,16] %x, f8e4m3fn[16,32] %w), '
           'custom_call_target="__cublas$lt$matmul$f8"\n'
           '%b = custom-call(f8e5m2[8,32] %g, f8e4m3fn[16,32] %w), '
           'custom_call_target="__cublas$lt$matmul$f8"\n'
           '%c = custom-call(bf16[8,16] %y, bf16[16,32] %v), '
           'custom_call_target="__cublas$lt$matmul"\n')
    assert gemm_custom_calls(hlo) == {"__cublas$lt$matmul$f8": 2, "__cublas$lt$matmul": 1,
                                      "__cublas$gemm": 0}


def test_resume_check_names_the_fp8_setting_of_the_checkpoint():
    on, off = {"fp8": True, "fp8_amax_history": 16}, {"fp8": False, "fp8_amax_history": 16}
    with pytest.raises(UserError, match=r"trained with fp8=False.*--config\.model\.fp8=False"):
        check_same_fp8(off, on, 10, "/w")
    with pytest.raises(UserError, match=r"--config\.model\.fp8_amax_history=16"):
        check_same_fp8(on, {"fp8": True, "fp8_amax_history": 8}, 10, "/w")
    check_same_fp8({"hidden_size": 128}, off, 10, "/w")  # older checkpoints had no fp8: off
    check_same_fp8(on, dict(on), 10, "/w")
    # The MLP-only stats do not fit a checkpoint of per-dense-layer stats (f8, or none given:
    # checkpoints from before fp8_gemm), and the other way round; f8 and qdq share a layout.
    mlp, f8 = {**on, "fp8_gemm": "mlp"}, {**on, "fp8_gemm": "f8"}
    with pytest.raises(UserError, match=r"fp8_gemm='f8'.*--config\.model\.fp8_gemm=f8"):
        check_same_fp8(f8, mlp, 10, "/w")
    with pytest.raises(UserError, match=r"--config\.model\.fp8_gemm=f8"):
        check_same_fp8(on, mlp, 10, "/w")
    with pytest.raises(UserError, match=r"--config\.model\.fp8_gemm=mlp"):
        check_same_fp8(mlp, {**on, "fp8_gemm": "qdq"}, 10, "/w")
    check_same_fp8(f8, {**on, "fp8_gemm": "qdq"}, 10, "/w")
    with pytest.raises(UserError, match=r"fp8_gemm='mlp'.*--config\.model\.fp8_gemm=mlp"):
        check_same_fp8(mlp, {**on, "fp8_gemm": "mlp_qkv"}, 10, "/w")
    with pytest.raises(UserError, match=r"fp8_gemm='mlp_qkv'.*--config\.model\.fp8_gemm=mlp_qkv"):
        check_same_fp8({**on, "fp8_gemm": "mlp_qkv"}, {**on, "fp8_gemm": "encoder"}, 10, "/w")
    check_same_fp8({**off, "fp8_gemm": "f8"}, {**off, "fp8_gemm": "mlp"}, 10, "/w")
    with pytest.raises(UserError, match=r"--config\.model\.fp8=False"):
        check_same_fp8({"hidden_size": 128}, on, 10, "/w")


def test_fp8_needs_compute_capability_8_9():
    assert fp8.capability_has_fp8("9.0") and fp8.capability_has_fp8("8.9")
    assert not fp8.capability_has_fp8("8.0") and not fp8.capability_has_fp8("7.0")
    assert fp8.capability_has_fp8(None) and fp8.capability_has_fp8("unknown")
    fp8.check_hardware(True)  # CPU: FP8 runs as written


@pytest.mark.parametrize("gemm", ["mlp", "mlp_qkv", "encoder"])
def test_fp8_mlp_model_quantizes_only_the_mlp_and_trains(setup, gemm):
    """fp8_gemm "mlp": the same params as the bf16 model, stats only for the MLP's two GEMMs
    ("mlp_qkv": and the QKV projection's; "encoder": and the attention output projection's),
    logits close to but not the full-precision ones once
    calibrated, the plain model without the stats, and a train step that records every stat
    (fused/fp8_mlp.py, fused/fp8_dense.py)."""
    batch, params = setup["batch"], setup["state"]["params"]
    model = MosaicBertForMaskedLM(tiny(fp8=True, fp8_gemm=gemm))
    ids = jnp.ones((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))
    assert jax.tree_util.tree_structure(shapes["params"]) == jax.tree_util.tree_structure(params)
    every_stat = {f"{t}_{v}" for t in fp8.TENSORS for v in ("scale", "amax_history")}
    if gemm == "mlp":
        assert set(at(shapes[fp8.STATS], LAYER0)) == {"mlp"}
    elif gemm == "mlp_qkv":
        assert set(at(shapes[fp8.STATS], LAYER0)) == {"mlp", "attention_self"}
        assert set(at(shapes[fp8.STATS], WQKV)) == every_stat
    else:
        assert set(at(shapes[fp8.STATS], LAYER0)) == {"mlp", "attention_self",
                                                      "attention_output"}
        assert set(at(shapes[fp8.STATS], WQKV)) == every_stat
        assert set(at(shapes[fp8.STATS], LAYER0 + ("attention_output", "dense"))) == every_stat
    assert set(at(shapes[fp8.STATS], LAYER0 + ("mlp",))) == {"gated_layers_fp8", "wo_fp8"}
    stats = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype)
                                   if s.ndim == 0 else jnp.zeros(s.shape, s.dtype),
                                   shapes[fp8.STATS])
    calibrated = _stats_after_one_pass(model, {"params": params, fp8.STATS: stats}, batch)
    exact = _centred_logits(MosaicBertForMaskedLM(tiny()), {"params": params}, batch)
    quantized = _centred_logits(model, {"params": params, fp8.STATS: calibrated}, batch)
    error = np.linalg.norm(quantized - exact) / np.linalg.norm(exact)
    assert 5e-4 < error < 2e-2, error
    np.testing.assert_array_equal(_centred_logits(model, {"params": params}, batch), exact)

    mesh = setup["mesh"]
    state, shardings = init_state(model, setup["tx"], 0, mesh)
    step = make_train_step(model, setup["tx"], setup["schedule"], mesh, shardings)
    new_state, metrics = step(state, batch)
    assert float(metrics["finite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(stats_of(model, new_state))[0]:
        if "amax_history" in jax.tree_util.keystr(leaf_path):
            assert float(leaf[0]) > 0, jax.tree_util.keystr(leaf_path)


def test_resume_with_the_default_fp8_is_exact(tmp_path):
    """The default FP8 mode's stats (two groups per MLP, one per attention projection) resume
    bit-exactly after a stop."""
    whole = train_and_evaluate(fp8_config("encoder"), str(tmp_path / "whole"))
    train_and_evaluate(fp8_config("encoder"), str(tmp_path / "split"), stop_after=2)
    resumed = train_and_evaluate(fp8_config("encoder"), str(tmp_path / "split"))
    assert resumed["resumed_from"] == 2
    model = MosaicBertForMaskedLM(model_config_from(fp8_config("encoder"), VOCAB))
    history = at(stats_of(model, resumed["state"]), LAYER0 + ("mlp", "wo_fp8",
                                                              "input_amax_history"))
    assert float(history[3]) > 0 and float(history[4]) == 0  # four steps rolled in
    for key in ("params", "fp8"):
        for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(whole["state"][key])),
                        jax.tree_util.tree_leaves(jax.device_get(resumed["state"][key]))):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kernels", ["xla", "pallas_interpret"])
def test_precomputed_gemm_scales_are_read_and_change_no_value(setup, kernels):
    """fp8.model_stats (the train step's STATS tree) adds each layer's three GEMM output
    scales, computed for all layers in one product: exactly the products of the layer's
    scales. The layers read them (a changed forward scale changes the logits, a changed
    gradient scale the gradients), and the logits, gradients and amaxes agree with the
    per-layer products' path, at random scales (fp8_gemm "encoder", also through the FP8 QKV
    + attention op of the Pallas kernels). Agree, not bit for bit: on CPU the two programs
    fuse apart, and a fusion may skip a bf16 rounding the other makes (on the GPU the train
    step's loss was bit-identical, benchmarks/RESULTS.md session 19); a wrong scale would be
    off by the ratio of two random scales, up to 25x."""
    rng = np.random.default_rng()
    model = MosaicBertForMaskedLM(tiny(
        fp8=True, fp8_gemm="encoder", attention_implementation=kernels,
        glu_implementation=kernels, layernorm_implementation=kernels))
    batch, params = setup["batch"], setup["state"]["params"]
    ids = jnp.ones((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))
    rows = fp8.stat_rows(shapes[fp8.STATS])
    stacked = {"scale": jnp.asarray(rng.uniform(0.002, 0.05, len(rows)), jnp.float32),
               "amax_history": jnp.zeros((len(rows), model.config.fp8_amax_history))}
    plain, precomputed = fp8.unstack_stats(stacked, rows), fp8.model_stats(stacked, rows)
    dense = LAYER0 + ("attention_output", "dense")
    for gemm, (a, b) in fp8.GEMM_SCALES.items():
        group = at(precomputed, dense)
        np.testing.assert_array_equal(group[f"{gemm}_gemm_scale"],
                                      group[f"{a}_scale"] * group[f"{b}_scale"])
    assert fp8.stat_rows(precomputed) == rows  # the rows (and the state's layout) stay

    def loss_and_grads(stats):
        def loss(params, stats):
            logits = model.apply({"params": params, fp8.STATS: stats}, batch["input_ids"],
                                 batch["segment_ids"],
                                 masked_positions=batch["masked_positions"])
            return masked_lm_sums(logits, batch["masked_labels"],
                                  batch["masked_weights"])["loss_sum"], logits
        (_, logits), (d_params, seen) = jax.jit(jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True))(params, stats)
        return logits, d_params, fp8.stack_seen(seen, rows)

    want, got = loss_and_grads(plain), loss_and_grads(precomputed)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3 * np.abs(a).max())
    assert float(jnp.min(got[2])) > 0  # every tensor recorded its amax
    # Where each scale shows: the logits (forward), the gradient of the dense layer's kernel
    # (kernel_grad), that of the QKV kernel before it, which dx reaches (input_grad).
    shows_in = {"input_grad": WQKV + ("kernel",), "kernel_grad": dense + ("kernel",)}
    for gemm in fp8.GEMM_SCALES:
        changed = copy(precomputed)
        at(changed, dense)[f"{gemm}_gemm_scale"] = 2 * at(changed, dense)[f"{gemm}_gemm_scale"]
        logits, d_params, _ = loss_and_grads(changed)
        if gemm == "forward":
            assert np.abs(np.asarray(logits - got[0], np.float32)).max() > 1e-3
        else:
            before = np.asarray(at(got[1], shows_in[gemm]))
            moved = np.abs(np.asarray(at(d_params, shows_in[gemm])) - before).max()
            assert moved > 0.1 * np.abs(before).max(), gemm
