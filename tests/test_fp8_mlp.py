"""The FP8 MLP (fused/fp8_mlp.py, model.fp8_gemm "mlp"): its float8-out GLU kernels and its
quantize kernel (Pallas interpreter on CPU) against the plain composition, the op's output and gradients against the
float32 MLP, the stats it writes against amaxes recomputed step by step from the same float8
operands, and the lowering of the kernels for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicbert_jax import fp8, fused
from mosaicbert_jax.fused import fp8_mlp, pallas_gpu
from attention_cases import fresh_rng, relative_error

E4M3, E5M2 = fp8.FORWARD_DTYPE, fp8.BACKWARD_DTYPE


def _seed(rng):
    return jnp.asarray(rng.integers(0, 2 ** 32, 2, dtype=np.uint64).astype(np.uint32))


def _f32(q) -> np.ndarray:
    return np.asarray(jnp.asarray(q).astype(jnp.float32))


def _glu_case(rng, dtype, backward: bool):
    rows, width = int(rng.choice([32, 64, 96])), int(rng.choice([64, 128, 192]))
    h = jnp.asarray(rng.standard_normal((rows, 2 * width)), dtype)
    g = jnp.asarray(rng.standard_normal((rows, width)) * 1e-3, dtype)
    return h, g


def _glu_fp8(impl, backward, h, g, seed, rate, inv_scale):
    fp8_dtype = E5M2 if backward else E4M3
    if backward:
        return jax.jit(lambda h, g, s: fused.glu_dropout_fp8_grad(
            h, g, seed, rate, s, fp8_dtype, impl))(h, g, inv_scale)
    return jax.jit(lambda h, s: fused.glu_dropout_fp8(h, seed, rate, s, fp8_dtype, impl))(
        h, inv_scale)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_fp8_glu_kernels_match_the_composition(backward, dtype, rate):
    rng, seed_value = fresh_rng()
    h, g = _glu_case(rng, dtype, backward)
    seed = _seed(rng)
    # The float32 values being quantised, and a scale that maps their amax to 0.9 * fmax.
    if backward:
        _, vjp = jax.vjp(lambda h: fused.reference.glu_dropout(h, seed, rate),
                         h.astype(jnp.float32))
        exact = np.asarray(vjp(g.astype(jnp.float32))[0])
    else:
        exact = np.asarray(fused.reference.glu_dropout(h.astype(jnp.float32), seed, rate))
    fmax = fp8.fp8_max(E5M2 if backward else E4M3)
    amax = float(np.max(np.abs(exact)))
    inv_scale = jnp.float32(0.9 * fmax / amax)
    got = _glu_fp8("pallas_interpret", backward, h, g, seed, rate, inv_scale)
    want = _glu_fp8("xla", backward, h, g, seed, rate, inv_scale)
    what = f"backward={backward} rate={rate} (seed {seed_value})"
    for q, q_t, q_amax in (got, want):
        assert q.dtype == (E5M2 if backward else E4M3) and q.shape == exact.shape
        np.testing.assert_array_equal(_f32(q_t), _f32(q).T, err_msg=what)
        np.testing.assert_allclose(float(q_amax), amax, rtol=1e-5, err_msg=what)
    a, b = _f32(got[0]), _f32(want[0])
    # The kernel's erf polynomial and the exact erf differ by ~1e-7, so a value may round to
    # the neighbouring float8 number, rarely: never further than one step (2**-2 relative for
    # e5m2, 2**-3 for e4m3, or the subnormal spacing, 2**-16 and 2**-9).
    step = (2.0 ** -2 if backward else 2.0 ** -3) * np.maximum(np.abs(a), np.abs(b))
    assert np.all(np.abs(a - b) <= step + (2.0 ** -16 if backward else 2.0 ** -9)), what
    assert np.mean(a == b) > 0.999, what
    if rate:
        assert np.all(a[exact == 0] == 0), what  # dropped (tiny values may also round to 0)
        assert 0.05 < np.mean(exact == 0) < 0.15
    # Really float8 at that scale: the dequantised values are a few percent off, not 1e-7.
    error = relative_error(a / float(inv_scale), exact)
    assert 5e-3 < error < (0.1 if backward else 0.05), (error, what)


def test_fp8_glu_kernel_saturates_instead_of_overflowing():
    """Values beyond fmax * scale clip to +-fmax (float8 e4m3fn has no infinity: an unclipped
    cast would give nan)."""
    rng, _ = fresh_rng()
    h = jnp.asarray(rng.standard_normal((32, 128)) * 3, jnp.float32)
    seed = jnp.zeros(2, jnp.uint32)
    exact = np.asarray(fused.reference.glu_dropout(h, seed, 0.0))
    inv_scale = jnp.float32(4 * fp8.fp8_max(E4M3) / np.max(np.abs(exact)))
    for impl in ("pallas_interpret", "xla"):
        q = _f32(fused.glu_dropout_fp8(h, seed, 0.0, inv_scale, E4M3, impl)[0])
        assert np.all(np.isfinite(q)) and np.max(np.abs(q)) == fp8.fp8_max(E4M3), impl


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_kernel_matches_the_composition(fp8_dtype, dtype):
    """fused.quantize_fp8 (the FP8 MLP's x and dy): the kernel in the interpreter gives the
    composition's float8 values bit for bit, in both layouts, with the exact amax; values
    beyond the range saturate."""
    rng, seed_value = fresh_rng()
    rows, width = int(rng.choice([64, 96, 192])), int(rng.choice([32, 96, 128]))
    x = jnp.asarray(rng.standard_normal((rows, width)) * rng.uniform(0.1, 10), dtype)
    amax = float(np.max(np.abs(_f32(x))))
    fmax = fp8.fp8_max(fp8_dtype)
    what = f"{rows}x{width} {dtype.__name__} (seed {seed_value})"
    for headroom in (0.9, 4.0):     # 4: the largest values clip to +-fmax
        inv_scale = jnp.float32(headroom * fmax / amax)
        got = jax.jit(lambda x, s: fused.quantize_fp8(x, s, fp8_dtype, "pallas_interpret"))(
            x, inv_scale)
        want = jax.jit(lambda x, s: fused.quantize_fp8(x, s, fp8_dtype, "xla"))(x, inv_scale)
        assert got[0].dtype == fp8_dtype and got[0].shape == (rows, width)
        assert got[1].shape == (width, rows)
        np.testing.assert_array_equal(_f32(got[0]), _f32(want[0]), err_msg=what)
        np.testing.assert_array_equal(_f32(got[1]), _f32(got[0]).T, err_msg=what)
        assert float(got[2]) == float(want[2]) == amax, what
        q = _f32(got[0])
        assert np.all(np.isfinite(q)) and np.max(np.abs(q)) <= fmax, what
        if headroom > 1:
            assert np.max(np.abs(q)) == fmax, what
        else:  # not clipped: the dequantised values are float8 roundings of x
            error = relative_error(q / float(inv_scale), _f32(x))
            assert 1e-3 < error < 0.1, (error, what)


def _mlp_case(rng, rate):
    m, k, f, n = int(rng.choice([32, 64])), 32, int(rng.choice([64, 128])), 32
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w_up = jnp.asarray(rng.standard_normal((k, 2 * f)) / np.sqrt(k), jnp.float32)
    w_down = jnp.asarray(rng.standard_normal((f, n)) / np.sqrt(f), jnp.float32)
    g = jnp.asarray(rng.standard_normal((m, n)) * 1e-4, jnp.float32)
    return x, w_up, w_down, g, _seed(rng)


def _stats(scales: dict, history_length: int = 4) -> dict:
    return {t: (jnp.float32(s), jnp.zeros(history_length, jnp.float32))
            for t, s in scales.items()}


def _step_by_step(x, w_up, w_down, g, seed, rate, up_scales, down_scales):
    """The op recomputed from its float8 operands with plain float32 dots: (ab, h, dh, d(ab))."""
    q = lambda v, d, s: fp8.quantize(v, d, jnp.float32(s)).astype(jnp.float32) * s  # weights
    # x and g go through fused.quantize_fp8, which multiplies by the inverse scale.
    qa = lambda v, d, s: (fused.reference.to_fp8(v, 1.0 / jnp.float32(s), d)
                          .astype(jnp.float32) * s)
    ab = qa(x, E4M3, up_scales["input"]) @ q(w_up, E4M3, up_scales["kernel"])
    h = fused.reference.glu_dropout(ab, seed, rate)
    dh = qa(g, E5M2, down_scales["output_grad"]) @ q(w_down, E4M3, down_scales["kernel"]).T
    _, vjp = jax.vjp(lambda ab: fused.reference.glu_dropout(ab, seed, rate), ab)
    return ab, h, dh, vjp(dh)[0]


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_fp8_mlp_matches_the_float32_mlp_and_writes_the_true_amaxes(impl, rate):
    rng, seed_value = fresh_rng()
    x, w_up, w_down, g, seed = _mlp_case(rng, rate)
    amax = lambda v: float(jnp.max(jnp.abs(v)))
    # Scales from the float32 MLP's amaxes (what delayed scaling settles to), then every
    # amax recomputed from the float8 operands those scales give.
    _, h32, _, dab32 = _step_by_step(x, w_up, w_down, g, seed, rate,
                                     {"input": 1.0, "kernel": 1.0}, {"output_grad": 1.0,
                                                                    "kernel": 1.0})
    up_scales = {"input": amax(x) / 448, "kernel": amax(w_up) / 448,
                 "output_grad": amax(dab32) / 57344}
    down_scales = {"input": amax(h32) / 448, "kernel": amax(w_down) / 448,
                   "output_grad": amax(g) / 57344}
    ab, h, dh, dab = _step_by_step(x, w_up, w_down, g, seed, rate, up_scales, down_scales)

    def run(x, w_up, w_down, up, down):
        y, vjp = jax.vjp(lambda x, wu, wd, up, down: fp8_mlp.glu_mlp(
            x, wu, wd, seed, up, down, rate, impl, jnp.float32), x, w_up, w_down, up, down)
        return (y,) + vjp(g)

    y, dx, d_w_up, d_w_down, new_up, new_down = jax.jit(run)(
        x, w_up, w_down, _stats(up_scales), _stats(down_scales))
    want = jax.vjp(lambda x, wu, wd: fp8_mlp.glu_mlp_reference(x, wu, wd, seed, rate,
                                                               jnp.float32), x, w_up, w_down)
    want = (want[0],) + want[1](g)
    what = f"impl={impl} rate={rate} (seed {seed_value})"
    # e4m3 rounds each operand by ~2.6% rms and e5m2 by twice that; four roundings on the way
    # to y (x, W_up, h, W_down) measured 6.5-7.3%, the gradients 7.6-9.7%. Float32 alone
    # would be ~1e-6; a wrong scale or a lost dropout mask is off by far more than the bars.
    for name, got, exact, bar in (("y", y, want[0], 0.12), ("dx", dx, want[1], 0.2),
                                  ("d_w_up", d_w_up, want[2], 0.2),
                                  ("d_w_down", d_w_down, want[3], 0.2)):
        error = relative_error(got, exact)
        assert 2e-3 < error < bar, (name, error, what)
    # The op's output is the float8 computation itself: the step-by-step one agrees closely.
    assert relative_error(y, fused.reference.to_fp8(h, 1.0 / jnp.float32(
        down_scales["input"]), E4M3).astype(jnp.float32) * down_scales["input"]
        @ (fp8.quantize(w_down, E4M3, jnp.float32(down_scales["kernel"])).astype(jnp.float32)
           * down_scales["kernel"])) < 2e-3, what
    true = {("up", "input"): amax(x), ("up", "kernel"): amax(w_up),
            ("up", "output_grad"): amax(dab), ("down", "input"): amax(h),
            ("down", "kernel"): amax(w_down), ("down", "output_grad"): amax(g)}
    for (group, tensor), value in true.items():
        # The stats' "cotangents": the amax seen in the scale's slot, zeros for the history.
        seen, zeros = (new_up if group == "up" else new_down)[tensor]
        np.testing.assert_allclose(float(seen), value, rtol=1e-4,
                                   err_msg=f"{group} {tensor} {what}")
        assert zeros.shape == (4,) and np.all(np.asarray(zeros) == 0)


def test_fp8_mlp_kernels_and_composition_agree_in_bf16():
    """In bf16 the interpreted kernels and the XLA composition compute the same float8 MLP
    (apart from rare neighbouring float8 roundings), far closer than either is to float32."""
    rng, seed_value = fresh_rng()
    x, w_up, w_down, g, seed = _mlp_case(rng, 0.1)
    up = _stats({"input": 4 / 448, "kernel": 0.8 / 448, "output_grad": 2e-4 / 57344})
    down = _stats({"input": 4 / 448, "kernel": 0.5 / 448, "output_grad": 4e-4 / 57344})
    args = [v.astype(jnp.bfloat16) for v in (x, w_up, w_down)]

    def run(impl):
        y, vjp = jax.vjp(lambda *a: fp8_mlp.glu_mlp(*a, seed, up, down, 0.1, impl,
                                                    jnp.bfloat16), *args)
        return (y,) + vjp(g.astype(jnp.bfloat16))

    kernels, composition = jax.jit(lambda: run("pallas_interpret"))(), jax.jit(
        lambda: run("xla"))()
    exact = jax.vjp(lambda *a: fp8_mlp.glu_mlp_reference(*a, seed, 0.1, jnp.float32),
                    x, w_up, w_down)
    exact = (exact[0],) + exact[1](g)
    for a, b, c in zip(kernels, composition, exact):
        assert a.dtype == jnp.bfloat16 and np.all(np.isfinite(_f32(a)))
        between, off = relative_error(a, b), relative_error(b, c)
        assert between < 0.25 * off, (between, off, seed_value)


def test_fp8_glu_kernels_lower_for_cuda():
    """The float8-out kernels pass the Triton lowering, with float8 stores of the right kind."""
    h = jnp.zeros((64, 2 * 3072), jnp.bfloat16)
    g = jnp.zeros((64, 3072), jnp.bfloat16)
    key, inv = jnp.zeros(2, jnp.uint32), jnp.float32(1.0)
    fwd = lambda h: pallas_gpu.glu_dropout_fp8(h, key, 0.1, inv, E4M3)
    bwd = lambda h: pallas_gpu.glu_dropout_fp8_grad(h, g, key, 0.1, inv, E5M2)
    quantize = lambda h: pallas_gpu.quantize_fp8(h[:, :768], inv, E5M2)
    for fn, kind in ((fwd, "f8E4M3FN"), (bwd, "f8E5M2"), (quantize, "f8E5M2")):
        text = jax.jit(fn).trace(h).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text
        assert kind in text
