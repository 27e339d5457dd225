"""FP8 matmuls with delayed per-tensor scaling, for the large GEMMs (issue 17; off by default).

model.fp8_gemm "encoder" (the default once model.fp8 is on, and the fastest measured: 789,824
against 637,226 tokens/s for bf16 on an H200, with the same 1000-step curve; benchmarks/
RESULTS.md session 12) puts every encoder GEMM in FP8: the GLU MLP as one op whose GLU kernels
quantise the wide tensors (fused/fp8_mlp.py, using this module's quantisation and stats), and
the fused QKV and attention output projections as an FP8 dense whose x and output gradient a
kernel quantises in both layouts (fused/fp8_dense.py; with the Pallas GPU attention the QKV
projection and the attention are one op whose backward kernels write d(qkv) as float8,
fused/fp8_attention.py: 804,960 against 790,241 tokens/s in one run, session 15). "mlp"
(754,073) is the MLP alone,
"mlp_qkv" (777,246) the MLP and the QKV projection. The MLM head stays in the compute dtype.

`Fp8DotGeneral` is a drop-in `dot_general` for nn.Dense (its `dot_general_cls`) and our own
dense layers, for every large GEMM. Two ways to run the same quantisation (e4m3 activation
and kernel, e5m2 output cotangent in the backward), picked by `gemm`:
  "f8": `fp8_matmul`, dot_generals whose operands ARE float8 arrays (preferred output in the
        compute dtype), the result times the two scales; the backward's two GEMMs are float8
        too (e5m2 x e4m3). XLA lowers these to cuBLASLt FP8 GEMMs on Hopper, and the saved
        residuals are the float8 operands (half the bytes).
  "qdq": quantise-dequantise each operand right before a bf16 dot_general, the pattern XLA's
        GemmRewriter folds into an FP8 GEMM only with --xla_gpu_enable_triton_gemm=false;
        under the default flags XLA drops the float8 round trip (no FP8 GEMM, bf16 error;
        measured by benchmarks/fp8_gemm_probe.py, numbers in benchmarks/RESULTS.md).
On other backends both run as written (the same rounding, no speed-up).

Delayed scaling: each tensor (input, kernel, output_grad) keeps, in the STATS collection, an
amax history and the scale used now: q = clip(x / scale, +-fmax).astype(fp8), x ~ q * scale.
After a step the tensor's amax is rolled into its history and the next scale is
max(history) * 2**margin / fmax (the old scale kept when that is 0 or not finite).
The amaxes come out of the backward pass: the stats are inputs of custom_vjp ops whose
"cotangent" for a scale is the amax its tensor had this step (`seen_stats`; zeros for the
history), so differentiating w.r.t. (params, stats) returns the amaxes as the scales'
"gradients". The train state holds every tensor's stats stacked, one row each (`stat_rows`,
`stack_stats`): the step rolls and rescales all of them at once (`updated_stacked`), two
arrays where per-tensor updates took about 430 tiny kernels a step (0.4 ms of kernels and
their launch gaps on an H200, session 13).
Applied without the STATS collection (fine-tuning, fill-mask, export), the layer computes a
plain dot in the compute dtype: the stats are training state, not part of the model.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STATS = "fp8_stats"  # the flax variable collection holding every FP8 dot's stats
FORWARD_DTYPE = jnp.float8_e4m3fn   # activations and kernels
BACKWARD_DTYPE = jnp.float8_e5m2    # output gradients
TENSORS = ("input", "kernel", "output_grad")
# The formulations (module docstring), model.fp8_gemm picks one; "mlp" puts only the GLU MLP's
# two GEMMs in FP8, its wide operands quantised inside the GLU kernels (fused/fp8_mlp.py), and
# leaves the attention GEMMs in the compute dtype; "mlp_qkv" also puts the fused QKV
# projection in FP8, its x and d(qkv) quantised by a kernel (fused/fp8_dense.py); "encoder"
# the attention output projection too.
GEMMS = ("f8", "qdq", "mlp", "mlp_qkv", "encoder")
# Which GEMMs own FP8 stats (and so the train state's layout) under each formulation.
_STATS_LAYOUT = {"f8": "every dense layer", "qdq": "every dense layer", "mlp": "the MLP",
                 "mlp_qkv": "the MLP and Wqkv",
                 "encoder": "the MLP, Wqkv and the attention output"}
# The dense layers that run fused/fp8_dense.py's op (their stats in the layer) under each.
_DENSE_OP_ROLES = {"mlp_qkv": frozenset({"qkv"}), "encoder": frozenset({"qkv", "attention_out"})}
MARGIN = 0


def capability_has_fp8(capability: Any) -> bool:
    """Whether a CUDA compute capability ("9.0") has FP8 tensor cores (>= 8.9); unknown: yes."""
    try:
        return capability is None or float(capability) >= 8.9
    except (TypeError, ValueError):
        return True


def check_hardware(enabled: bool) -> None:
    """Refuses FP8 on a GPU without FP8 tensor cores (A100, V100), where the float8 GEMMs and
    kernels cannot run; CPU and TPU run them as written."""
    if not enabled or jax.default_backend() != "gpu":
        return
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if not capability_has_fp8(capability):
        raise ValueError(f"model.fp8 needs a GPU with FP8 tensor cores (compute capability "
                         f">= 8.9: H100, H200, L4, L40); {device.device_kind} has "
                         f"{capability}; set --config.model.fp8=False")


def stats_layout(gemm: str) -> str:
    """Which layers keep FP8 stats under fp8_gemm `gemm`: two formulations whose layouts are
    equal give train states of the same structure (a checkpoint of one resumes the other)."""
    return _STATS_LAYOUT.get(gemm, gemm)


def kernel_quantized(gemm: str) -> bool:
    """Whether `gemm` runs the MLP as fused/fp8_mlp.py's op (its kernels drop with hash
    dropout masks) rather than through Fp8DotGeneral."""
    return gemm in ("mlp", "mlp_qkv", "encoder")


def dense_op_roles(gemm: str) -> frozenset:
    """Which dense layers ("qkv", "attention_out") run as fused/fp8_dense.py's op under `gemm`."""
    return _DENSE_OP_ROLES.get(gemm, frozenset())


def fp8_max(dtype: Any) -> float:
    """The largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(jnp.finfo(dtype).max)


def quantize(x: jax.Array, fp8_dtype: Any, scale: jax.Array) -> jax.Array:
    """x / scale as a `fp8_dtype` array (clipped to +-fmax): x ~ quantize(x) * scale."""
    limit = fp8_max(fp8_dtype)
    return jnp.clip(x / scale.astype(x.dtype), -limit, limit).astype(fp8_dtype)


def to_fp8(y: jax.Array, inv_scale: jax.Array, fp8_dtype: Any) -> jax.Array:
    """y * inv_scale (float32) clipped to the dtype's finite range, as fp8_dtype: how every
    kernel quantises (a multiply by the inverse scale, where `quantize` divides)."""
    limit = fp8_max(fp8_dtype)
    return jnp.clip(y.astype(jnp.float32) * inv_scale.astype(jnp.float32), -limit,
                    limit).astype(fp8_dtype)


def quantize_dequantize(x: jax.Array, fp8_dtype: Any, scale: jax.Array) -> jax.Array:
    """x rounded through `fp8_dtype` at `scale` (values beyond fmax * scale clip), in x.dtype."""
    return quantize(x, fp8_dtype, scale).astype(x.dtype) * scale.astype(x.dtype)


def roll_history(history: jax.Array, amax: jax.Array) -> jax.Array:
    """The history (last axis) with its oldest entry dropped and `amax` first; a non-finite
    amax is recorded as 0 (no information), so one bad step cannot poison the next scales.
    Batched: history [..., H] and amax [...]."""
    amax = jnp.where(jnp.isfinite(amax), amax, 0.0).astype(history.dtype)
    return jnp.concatenate([amax[..., None], history[..., :-1]], axis=-1)


def scale_from_history(history: jax.Array, old_scale: jax.Array, fp8_dtype: Any,
                       margin: int = MARGIN) -> jax.Array:
    """max(history) * 2**margin / fmax, or `old_scale` when that max is 0, inf or nan.
    Batched: history [..., H], old_scale [...]; fp8_dtype may instead be fmax per row."""
    fmax = (fp8_dtype if isinstance(fp8_dtype, (np.ndarray, jax.Array))
            else fp8_max(fp8_dtype))
    amax = jnp.max(history, axis=-1)
    scale = amax * (2.0 ** margin) / fmax
    good = jnp.isfinite(amax) & (amax > 0)
    return jnp.where(good, scale, old_scale).astype(old_scale.dtype)


def _amax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def seen_stats_from_amax(amax: jax.Array, history: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The "cotangents" of a tensor's (scale, history) once it measured `amax` this step: the
    amax in the scale's slot, zeros for the history (`updated_stacked` rolls it in)."""
    return amax.astype(jnp.float32), jnp.zeros_like(history)


def seen_stats(x: jax.Array, history: jax.Array) -> tuple[jax.Array, jax.Array]:
    """seen_stats_from_amax of `x`'s amax: what `x` going through FP8 reports."""
    return seen_stats_from_amax(_amax(x), history)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def qdq_operand(fp8_dtype: Any, x: jax.Array, scale: jax.Array, history: jax.Array):
    """Forward: x through FP8 at `scale`. Backward: x's cotangent passes straight through;
    the cotangents of (scale, history) are x's seen_stats."""
    return quantize_dequantize(x, fp8_dtype, scale)


def _qdq_operand_fwd(fp8_dtype, x, scale, history):
    return quantize_dequantize(x, fp8_dtype, scale), seen_stats(x, history)


def _qdq_operand_bwd(fp8_dtype, seen, g):
    amax, zeros = seen
    return g, amax, zeros


qdq_operand.defvjp(_qdq_operand_fwd, _qdq_operand_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def qdq_cotangent(fp8_dtype: Any, y: jax.Array, scale: jax.Array, history: jax.Array):
    """Forward: identity. Backward: y's cotangent goes through FP8 at `scale`; the
    cotangents of (scale, history) are that cotangent's seen_stats."""
    return y


def _qdq_cotangent_fwd(fp8_dtype, y, scale, history):
    return y, (scale, history)


def _qdq_cotangent_bwd(fp8_dtype, residual, g):
    scale, history = residual
    amax, zeros = seen_stats(g, history)
    return quantize_dequantize(g, fp8_dtype, scale), amax, zeros


qdq_cotangent.defvjp(_qdq_cotangent_fwd, _qdq_cotangent_bwd)


def scaled_dot(a: jax.Array, b: jax.Array, dims: Any, scale: jax.Array, dtype: Any):
    """dot_general of two float8 arrays, accumulated in float32, as `dtype`, times `scale`."""
    out = jax.lax.dot_general(a, b, dims, preferred_element_type=dtype)
    return out * scale.astype(dtype)


_MATMUL = (((1,), (0,)), ((), ()))   # [m, k] x [k, n]
_GRAD_LHS = (((1,), (1,)), ((), ()))  # [m, n] x [k, n] -> [m, k]
_GRAD_RHS = (((0,), (0,)), ((), ()))  # [m, k] x [m, n] -> [k, n]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_matmul(dtype: Any, x: jax.Array, w: jax.Array, x_stats: tuple, w_stats: tuple,
               g_stats: tuple) -> jax.Array:
    """x [..., k] @ w [k, n] as FP8 GEMMs, in `dtype` (x and w must already be `dtype`).

    Each *_stats is (scale, amax_history). Forward: e4m3(x) @ e4m3(w). Backward: e5m2(g) @
    e4m3(w).T and e4m3(x).T @ e5m2(g); the "cotangents" of the stats are their seen_stats."""
    return _fp8_matmul_fwd(dtype, x, w, x_stats, w_stats, g_stats)[0]


def _fp8_matmul_fwd(dtype, x, w, x_stats, w_stats, g_stats):
    (x_scale, _), (w_scale, _) = x_stats, w_stats
    qx = quantize(x.reshape(-1, x.shape[-1]), FORWARD_DTYPE, x_scale)
    qw = quantize(w, FORWARD_DTYPE, w_scale)
    y = scaled_dot(qx, qw, _MATMUL, x_scale * w_scale, dtype)
    new_x = seen_stats(x, x_stats[1])
    new_w = seen_stats(w, w_stats[1])
    return y.reshape(x.shape[:-1] + w.shape[1:]), (qx, qw, x_scale, w_scale, g_stats, new_x,
                                                    new_w)


def _fp8_matmul_bwd(dtype, residual, g):
    qx, qw, x_scale, w_scale, (g_scale, g_history), new_x, new_w = residual
    g2 = g.reshape(-1, g.shape[-1])
    qg = quantize(g2, BACKWARD_DTYPE, g_scale)
    dx = scaled_dot(qg, qw, _GRAD_LHS, g_scale * w_scale, dtype)
    dw = scaled_dot(qx, qg, _GRAD_RHS, x_scale * g_scale, dtype)
    new_g = seen_stats(g, g_history)
    return dx.reshape(g.shape[:-1] + qx.shape[-1:]), dw, new_x, new_w, new_g


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def qdq_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, x_stats: tuple,
                    w_stats: tuple, g_stats: tuple, dtype: Any, precision: Any = None,
                    out_dtype: Optional[Any] = None):
    """lax.dot_general of the e4m3-quantise-dequantised operands in `dtype` (result in
    out_dtype, default dtype), its output cotangent quantise-dequantised to e5m2: the "qdq"
    formulation (stats as fp8_matmul's)."""
    lhs = qdq_operand(FORWARD_DTYPE, lhs.astype(dtype), *x_stats)
    rhs = qdq_operand(FORWARD_DTYPE, rhs.astype(dtype), *w_stats)
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=out_dtype or dtype)
    return qdq_cotangent(BACKWARD_DTYPE, out, *g_stats)


# The three GEMMs of an FP8 dense layer and the two tensors whose scales multiply into each
# one's output scale: y = x W, dx = g W^T, dW = x^T g.
GEMM_SCALES = {"forward": ("input", "kernel"), "input_grad": ("output_grad", "kernel"),
               "kernel_grad": ("input", "output_grad")}


def gemm_scale(stats: Mapping, gemm: str) -> jax.Array:
    """The output scale of one of a layer's FP8 GEMMs (GEMM_SCALES): the product of its two
    tensors' scales, precomputed by `model_stats` in the train step (the same float32 value)."""
    if "gemm" in stats:
        return stats["gemm"][gemm]
    a, b = GEMM_SCALES[gemm]
    return stats[a][0] * stats[b][0]


def stats_cotangent(stats: Mapping, seen: Mapping) -> dict:
    """The "cotangent" of a stats dict for a custom_vjp: the seen stats of its tensors
    (seen_stats) and zeros for the precomputed GEMM scales, which record nothing."""
    if "gemm" not in stats:
        return dict(seen)
    return {**seen, "gemm": jax.tree_util.tree_map(jnp.zeros_like, stats["gemm"])}


def stats_variables(module: nn.Module, history_length: int) -> Optional[dict]:
    """tensor -> (scale, amax_history) of `module`'s STATS variables (created when
    initialising), for tensor in TENSORS, plus "gemm": GEMM_SCALES name -> scale where the
    train step precomputed them (model_stats); None when the module is applied without them."""
    if not (module.is_initializing() or module.has_variable(STATS, "input_scale")):
        return None
    stats = {tensor: (
        module.variable(STATS, f"{tensor}_scale", jnp.ones, (), jnp.float32).value,
        module.variable(STATS, f"{tensor}_amax_history", jnp.zeros, (history_length,),
                        jnp.float32).value) for tensor in TENSORS}
    if module.has_variable(STATS, "forward_gemm_scale"):
        stats["gemm"] = {gemm: module.get_variable(STATS, f"{gemm}_gemm_scale")
                         for gemm in GEMM_SCALES}
    return stats


class Fp8Stats(nn.Module):
    """The STATS of one FP8 GEMM that is not an Fp8DotGeneral (the FP8 MLP's): calling it
    gives stats_variables' dict, or None without the collection."""

    history_length: int = 16

    @nn.compact
    def __call__(self) -> Optional[dict]:
        return stats_variables(self, self.history_length)


class Fp8DotGeneral(nn.Module):
    """lax.dot_general with e4m3 operands and an e5m2 output gradient, delayed scaling.

    Stats (collection STATS): `{tensor}_scale` [] and `{tensor}_amax_history` [history_length]
    for tensor in TENSORS. Call signature as lax.dot_general (how nn.Dense calls it)."""

    history_length: int = 16
    gemm: str = "f8"   # one of GEMMS (module docstring)

    @nn.compact
    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                 precision: Any = None, preferred_element_type: Optional[Any] = None):
        stats = stats_variables(self, self.history_length)
        if stats is None:
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type)
        compute_dtype = jnp.result_type(lhs, rhs)
        plain_matmul = (tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
                        and not any(dimension_numbers[1]) and rhs.ndim == 2)
        if self.gemm == "f8" and plain_matmul:
            out_dtype = preferred_element_type or compute_dtype
            return fp8_matmul(out_dtype, lhs.astype(out_dtype), rhs.astype(out_dtype),
                              stats["input"], stats["kernel"], stats["output_grad"])
        return qdq_dot_general(lhs, rhs, dimension_numbers, stats["input"], stats["kernel"],
                               stats["output_grad"], compute_dtype, precision,
                               preferred_element_type)


def dot_general_cls(enabled: bool, history_length: int, gemm: str = "f8") -> Any:
    """What to pass as nn.Dense(dot_general_cls=...): None (plain dot) or an Fp8DotGeneral.
    None too for gemm "mlp", "mlp_qkv" and "encoder": there the MLP's own op (and the dense
    layers of dense_op_roles) is FP8 and every other GEMM is not."""
    if not enabled or kernel_quantized(gemm):
        return None
    return partial(Fp8DotGeneral, history_length=history_length, gemm=gemm)


def combine_microbatch_stats(a: Any, b: Any) -> Any:
    """Elementwise max: the amaxes microbatches of one step saw combine to those of the whole
    batch (its amax is the max of theirs)."""
    return jax.tree_util.tree_map(jnp.maximum, a, b)


StatRows = tuple  # of (module name, ..., tensor) paths: the rows of the stacked layout


def stat_rows(tree: Mapping) -> StatRows:
    """The path (module names..., tensor) of every stats group in a STATS tree, in one fixed
    order (sorted keys): row i of the stacked layout is the tensor at path i."""
    rows = []

    def walk(node, path):
        for key in sorted(node):
            tensor = key[:-len("_scale")]
            if key.endswith("_scale") and tensor in TENSORS:
                rows.append(path + (tensor,))
            elif isinstance(node[key], Mapping):
                walk(node[key], path + (key,))
    walk(tree, ())
    return tuple(rows)


def _group(tree: Mapping, row: tuple) -> Mapping:
    for key in row[:-1]:
        tree = tree[key]
    return tree


def stack_stats(tree: Mapping, rows: StatRows) -> dict:
    """A STATS tree as the train state holds it: {"scale": [rows], "amax_history": [rows, H]}."""
    return {"scale": jnp.stack([_group(tree, r)[f"{r[-1]}_scale"] for r in rows]),
            "amax_history": jnp.stack([_group(tree, r)[f"{r[-1]}_amax_history"]
                                       for r in rows])}


def stack_seen(tree: Mapping, rows: StatRows) -> jax.Array:
    """The amaxes a pass saw (the scales' "gradients" in a STATS-shaped tree), one per row."""
    return jnp.stack([_group(tree, r)[f"{r[-1]}_scale"] for r in rows])


def unstack_stats(stacked: Mapping, rows: StatRows) -> dict:
    """The STATS tree the model reads, from stack_stats' layout (row slices, no copies)."""
    tree: dict = {}
    for i, row in enumerate(rows):
        node = tree
        for key in row[:-1]:
            node = node.setdefault(key, {})
        node[f"{row[-1]}_scale"] = stacked["scale"][i]
        node[f"{row[-1]}_amax_history"] = stacked["amax_history"][i]
    return tree


def model_stats(stacked: Mapping, rows: StatRows) -> dict:
    """The STATS tree the train step applies the model with: unstack_stats plus, in every
    layer with all three tensors, the output scales of its three GEMMs
    (`{gemm}_gemm_scale`, see gemm_scale), computed for all layers in one vector product.
    Computed per GEMM from two row slices, XLA gave each FP8 GEMM a scalar product kernel of
    its own and each row slice a device copy: about 260 tiny kernels a base step."""
    tree = unstack_stats(stacked, rows)
    index = {row: i for i, row in enumerate(rows)}
    groups = sorted({row[:-1] for row in rows
                     if all(row[:-1] + (t,) in index for t in TENSORS)})
    if not groups:
        return tree
    scale = stacked["scale"]
    for gemm, (a, b) in GEMM_SCALES.items():
        ia = np.array([index[g + (a,)] for g in groups])
        ib = np.array([index[g + (b,)] for g in groups])
        products = scale[ia] * scale[ib]
        for k, group in enumerate(groups):
            _group(tree, group + (a,))[f"{gemm}_gemm_scale"] = products[k]
    return tree


def row_fmax(rows: StatRows) -> np.ndarray:
    """fmax of each row's FP8 dtype: e5m2 for output gradients, e4m3 for the rest."""
    return np.array([fp8_max(BACKWARD_DTYPE if row[-1] == "output_grad" else FORWARD_DTYPE)
                     for row in rows], np.float32)


def updated_stacked(old: Mapping, seen_amax: jax.Array, rows: StatRows) -> dict:
    """The stacked stats after a step that saw `seen_amax` (one per row): each amax rolled
    into its row's history, each scale recomputed from it (the old one where it is all 0)."""
    history = roll_history(old["amax_history"], seen_amax)
    return {"scale": scale_from_history(history, old["scale"], row_fmax(rows)),
            "amax_history": history}


def updated_stats(old: Mapping, seen: Mapping) -> dict:
    """updated_stacked for STATS trees: the stats after a pass whose stats' "gradients" were
    `seen` (its amaxes, possibly combined over microbatches)."""
    rows = stat_rows(old)
    return unstack_stats(updated_stacked(stack_stats(old, rows), stack_seen(seen, rows), rows),
                         rows)
