"""The fused GLU and LayerNorm kernels (Pallas, run by the interpreter on CPU) against the plain
XLA composition, forward and gradients, fp32 and bf16, on fresh random inputs; and the model
with the fused ops against the unfused model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM, fused
from mosaicbert_jax.fused import pallas_gpu
from attention_cases import fresh_rng, relative_error
from model_cases import assert_same_loss_and_grads, mlm_loss_fn, random_mlm_batch

# fp32: both paths drop the same elements, so only float rounding separates them.
# bf16: the kernels round once (float32 in registers), the composition at every op.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _seed(rng):
    return jnp.asarray(rng.integers(0, 2 ** 32, 2, dtype=np.uint64).astype(np.uint32))


def _value_and_grads(fn, args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return (out,) + tuple(vjp(cotangent))


def _assert_close(got, want, dtype, seed, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, f"{what}[{i}]: dtype {g.dtype} != {w.dtype}"
        assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{what}[{i}] (seed {seed})"
        err = relative_error(g, w)
        assert err < TOLERANCE[dtype], f"{what}[{i}]: relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_glu_kernel_matches_composition(dtype, rate):
    rng, seed = fresh_rng()
    rows = int(rng.choice([24, 40, 64]))
    width = int(rng.choice([64, 96, 192]))
    h = jnp.asarray(rng.standard_normal((2, rows, 2 * width)), dtype)
    g = jnp.asarray(rng.standard_normal((2, rows, width)), dtype)
    key = _seed(rng)
    run = lambda impl: jax.jit(lambda h, g: _value_and_grads(
        lambda h: fused.glu_dropout(h, key, rate, impl), (h,), g))(h, g)
    got, want = run("pallas_interpret"), run("xla")
    _assert_close(got, want, dtype, seed, f"glu rate={rate}")
    if rate and dtype == jnp.float32:  # the same elements are dropped, exactly
        np.testing.assert_array_equal(np.asarray(got[0]) == 0, np.asarray(want[0]) == 0)
        assert 0.05 < float(np.mean(np.asarray(got[0]) == 0)) < 0.15


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_layernorm_kernel_matches_composition(dtype, rate):
    rng, seed = fresh_rng()
    rows, width = int(rng.choice([16, 48, 80])), int(rng.choice([48, 128, 768]))
    x, r, dy = (jnp.asarray(rng.standard_normal((rows, width)), dtype) for _ in range(3))
    # non-trivial affine parameters, so a swapped scale/bias gradient cannot pass
    x_bias, scale, bias = (jnp.asarray(rng.standard_normal(width), jnp.float32) * 0.5 + off
                           for off in (0.0, 1.0, 0.0))
    key = _seed(rng)
    run = lambda impl: jax.jit(lambda *a: _value_and_grads(
        lambda x, r, s, b, xb: fused.dropout_add_layernorm(
            x, r, s, b, key, rate, 1e-12, xb, implementation=impl), a, dy))(
        x, r, scale, bias, x_bias)
    _assert_close(run("pallas_interpret"), run("xla"), dtype, seed, f"layernorm rate={rate}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layernorm_with_two_consumers_adds_their_cotangents(dtype):
    """copies=2: the kernel's backward adds the two outputs' cotangents itself; the gradients
    equal autodiff's of one output used twice, and differ from either cotangent alone."""
    rng, seed = fresh_rng()
    rows, width = int(rng.choice([48, 80, 144])), 768
    x, r, dy1, dy2 = (jnp.asarray(rng.standard_normal((rows, width)), dtype) for _ in range(4))
    x_bias, scale, bias = (jnp.asarray(rng.standard_normal(width), jnp.float32) * 0.5 + off
                           for off in (0.0, 1.0, 0.0))
    key = _seed(rng)

    def grads(impl, copies, cotangents):
        def fn(x, r, s, b, xb):
            return fused.dropout_add_layernorm(x, r, s, b, key, 0.1, 1e-12, xb,
                                               implementation=impl, copies=copies)
        out, vjp = jax.vjp(fn, x, r, scale, bias, x_bias)
        return vjp(cotangents)

    two = jax.jit(lambda: grads("pallas_interpret", 2, (dy1, dy2)))()
    summed = jax.jit(lambda: grads("xla", 1, dy1 + dy2))()
    _assert_close(two, summed, dtype, seed, "layernorm copies=2")
    first_only = jax.jit(lambda: grads("xla", 1, dy1))()
    assert relative_error(two[0], first_only[0]) > 0.3  # the second cotangent counted


def test_kernels_lower_for_cuda():
    """The Pallas kernels pass the Triton lowering (the step a GPU compile starts with)."""
    h = jnp.zeros((64, 2 * 3072), jnp.bfloat16)
    x = jnp.zeros((64, 768), jnp.bfloat16)
    key, s = jnp.zeros(2, jnp.uint32), jnp.ones(768)
    glu = lambda h: jax.vjp(lambda h: pallas_gpu.glu_dropout(h, key, 0.1), h)[1](h[:, :3072])
    ln = lambda x: jax.vjp(lambda x, r: pallas_gpu.dropout_add_layernorm(
        x, r, s, s, key, 0.1, 1e-12, s), x, x)[1](x)
    ln2 = lambda x: jax.vjp(lambda x, r: pallas_gpu.dropout_add_layernorm(
        x, r, s, s, key, 0.1, 1e-12, s, copies=2), x, x)[1]((x, x))
    for fn, arg in ((glu, h), (ln, x), (ln2, x)):
        text = jax.jit(fn).trace(arg).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text
        # GELU's reciprocal is the GPU's approximate one in both GLU kernels (not the IEEE
        # division the interpreter runs); the LayerNorm kernels have none.
        assert text.count("rcp.approx.ftz.f32") == (2 if fn is glu else 0)


def test_model_with_fused_ops_equals_unfused_model():
    """Same parameters (names and init), same dropout masks: loss and every gradient agree."""
    rng, seed = fresh_rng()
    batch = random_mlm_batch(rng, np.repeat([[1] * 20 + [2] * 8 + [0] * 4], 2, 0), masked=6)
    results = {}
    for impl in ("xla", "pallas_interpret"):
        cfg = MosaicBertConfig.tiny(vocab_size=128, glu_implementation=impl,
                                    layernorm_implementation=impl,
                                    attention_implementation="xla")
        model = MosaicBertForMaskedLM(cfg)
        params = model.init(jax.random.key(0), batch[0], batch[1])["params"]
        loss = mlm_loss_fn(model, batch, dropout_seed=seed)
        results[impl] = (params, jax.jit(jax.value_and_grad(loss))(params))
    (p_ref, want), (p_fused, got) = results["xla"], results["pallas_interpret"]
    assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_fused)
    for a, b in zip(jax.tree_util.tree_leaves(p_ref), jax.tree_util.tree_leaves(p_fused)):
        np.testing.assert_array_equal(a, b)
    assert_same_loss_and_grads(want, got, seed)


def test_config_rejects_fused_kernels_with_threefry_dropout():
    with pytest.raises(ValueError, match="dropout_rng='hash'"):
        MosaicBertConfig.tiny(glu_implementation="pallas", dropout_rng="threefry")
    with pytest.raises(ValueError, match="glu_implementation"):
        MosaicBertConfig.tiny(glu_implementation="cuda")


def test_auto_picks_xla_off_gpu_and_for_unsupported_widths():
    assert fused.resolve("auto", 768, backend_has_pallas=False) == "xla"
    assert fused.resolve("auto", 768, backend_has_pallas=True) == "pallas"
    assert fused.resolve("auto", 40, backend_has_pallas=True) == "xla"
    assert fused.resolve("auto", 768, "threefry", backend_has_pallas=True) == "xla"
    with pytest.raises(ValueError, match="multiple of 16"):
        fused.resolve("pallas", 40)


@pytest.mark.parametrize("dtype,step_rows", [(jnp.float32, 4), (jnp.bfloat16, 4),
                                             (jnp.float32, 1), (jnp.bfloat16, 2)])
def test_layernorm_backward_with_deferred_sums_matches_composition(dtype, step_rows):
    """FusedBlocks.ln_deferred_sums_bwd (d(scale), d(bias), d(x_bias) kept as row tiles and
    reduced once per block) gives the composition's gradients, over several blocks and
    steps of 1, 2 or 4 rows; parse_blocks reads the flag."""
    rng, seed = fresh_rng()
    rows, width = 48, int(rng.choice([128, 768]))
    x, r, dy = (jnp.asarray(rng.standard_normal((rows, width)), dtype) for _ in range(3))
    x_bias, scale, bias = (jnp.asarray(rng.standard_normal(width), jnp.float32) * 0.5 + off
                           for off in (0.0, 1.0, 0.0))
    key = _seed(rng)
    blocks = pallas_gpu.parse_blocks(
        f"ln_deferred_sums_bwd=1,ln_rows_bwd={step_rows},ln_block_rows_bwd=16")
    assert blocks.ln_deferred_sums_bwd is True and blocks.ln_rows_bwd == step_rows
    with pytest.raises(ValueError, match="fused block 'nope=1' is not field=int"):
        pallas_gpu.parse_blocks("nope=1")

    def run(fn):
        return jax.jit(lambda *a: _value_and_grads(fn, a, dy))(x, r, scale, bias, x_bias)

    got = run(lambda x, r, s, b, xb: pallas_gpu.dropout_add_layernorm(
        x, r, s, b, key, 0.1, 1e-12, xb, interpret=True, blocks=blocks))
    want = run(lambda x, r, s, b, xb: fused.dropout_add_layernorm(
        x, r, s, b, key, 0.1, 1e-12, xb, implementation="xla"))
    _assert_close(got, want, dtype, seed, "layernorm deferred sums")
