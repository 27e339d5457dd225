"""One attention entry point; implementations plug in by name.

`attention(q, k, v, segment_ids, alibi_slopes, implementation=...)` takes and returns
[batch, seq, heads, head_dim]. The model never imports a kernel directly, so a kernel's
backend (Pallas Triton, Mosaic GPU, Mosaic TPU, jax-triton) can change without touching it.
`window=w > 0` adds sliding-window (local) attention: query i sees only keys with
|i - j| <= w. Implementations get it as a `window` keyword only when w > 0, so callables
registered without one keep working for full attention.

`attention_qkv(qkv, ...)` takes the fused projection [batch, seq, 3, heads, head_dim] (q, k, v
in slots 0, 1, 2), as the model produces it. Implementations with a fused-QKV entry (pallas,
pallas_interpret) read the slots in place and return d(qkv) as one array; every other one
gets the three slices, as `attention` would.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mosaicbert_jax.attention.alibi import alibi_slopes
from mosaicbert_jax.attention.block_sparsity import check_qkv_bias, check_window
from mosaicbert_jax.attention.reference import xla_attention

AttentionFn = Callable[..., jax.Array]

# name -> "module:function" loaded on first use, so optional backends cost nothing to import.
_LAZY_IMPLEMENTATIONS: dict[str, str] = {
    "cudnn": "mosaicbert_jax.attention.cudnn:cudnn_attention",
    "pallas": "mosaicbert_jax.attention.pallas_gpu:pallas_attention",
    "pallas_interpret": "mosaicbert_jax.attention.pallas_gpu:pallas_attention_interpret",
    "pallas_tpu": "mosaicbert_jax.attention.pallas_tpu:pallas_tpu_attention",
    "pallas_tpu_interpret": "mosaicbert_jax.attention.pallas_tpu:pallas_tpu_attention_interpret",
    "triton": "mosaicbert_jax.attention.triton_kernels:triton_attention",
}
_IMPLEMENTATIONS: dict[str, AttentionFn] = {"xla": xla_attention}
# name -> fused-QKV entry fn(qkv, segment_ids, slopes, scale[, window]) of that implementation.
_LAZY_QKV_IMPLEMENTATIONS: dict[str, str] = {
    "pallas": "mosaicbert_jax.attention.pallas_gpu:pallas_attention_qkv",
    "pallas_interpret": "mosaicbert_jax.attention.pallas_gpu:pallas_attention_qkv_interpret",
}
_QKV_IMPLEMENTATIONS: dict[str, AttentionFn] = {}
# Built-in implementations with a sliding window (the Triton kernel has none yet).
_WINDOW_BUILTINS = ("cudnn", "pallas", "pallas_interpret", "pallas_tpu", "pallas_tpu_interpret",
                    "xla")


def register_implementation(name: str, target: str | AttentionFn) -> None:
    """Registers an attention implementation by callable or 'module:function' path.

    target takes q, k, v; a name registered again loses any built-in fused-QKV entry, so
    attention_qkv hands the new target the slices.
    """
    _LAZY_QKV_IMPLEMENTATIONS.pop(name, None)
    _QKV_IMPLEMENTATIONS.pop(name, None)
    if callable(target):
        _IMPLEMENTATIONS[name] = target
    else:
        _LAZY_IMPLEMENTATIONS[name] = target


def available_implementations() -> list[str]:
    return sorted(set(_IMPLEMENTATIONS) | set(_LAZY_IMPLEMENTATIONS) | {"auto"})


def _load(name: str) -> AttentionFn:
    if name in _IMPLEMENTATIONS:
        return _IMPLEMENTATIONS[name]
    if name not in _LAZY_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; "
                         f"available: {available_implementations()}")
    module_name, fn_name = _LAZY_IMPLEMENTATIONS[name].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    _IMPLEMENTATIONS[name] = fn
    return fn


def _load_qkv(name: str) -> Optional[AttentionFn]:
    """The fused-QKV entry of a resolved implementation name, or None if it has none."""
    if name not in _QKV_IMPLEMENTATIONS and name in _LAZY_QKV_IMPLEMENTATIONS:
        module_name, fn_name = _LAZY_QKV_IMPLEMENTATIONS[name].split(":")
        _QKV_IMPLEMENTATIONS[name] = getattr(importlib.import_module(module_name), fn_name)
    return _QKV_IMPLEMENTATIONS.get(name)


def qkv_implementations() -> list[str]:
    """Names whose implementation reads a fused qkv array in place (see attention_qkv)."""
    return sorted(set(_QKV_IMPLEMENTATIONS) | set(_LAZY_QKV_IMPLEMENTATIONS))


def _accepts_window(fn: AttentionFn) -> bool:
    try:
        return "window" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def window_implementations() -> list[str]:
    """Names of the implementations that take a sliding window (window > 0)."""
    registered = [name for name, fn in _IMPLEMENTATIONS.items() if _accepts_window(fn)]
    return sorted(set(_WINDOW_BUILTINS) | set(registered))


def gpu_supports_pallas() -> bool:
    """Our Triton-backend kernel needs Ampere or newer (compute capability >= 8.0)."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return capability is None or float(capability) >= 8.0
    except (TypeError, ValueError):
        return True


def resolve_implementation(implementation: str, backend: Optional[str] = None) -> str:
    """Maps 'auto' to the fastest implementation for the backend, 'pallas' to the Pallas
    kernel of the backend (the TPU one on TPU); checks other names."""
    if implementation not in ("auto", "pallas"):
        if implementation not in available_implementations():
            raise ValueError(f"unknown attention implementation {implementation!r}; "
                             f"available: {available_implementations()}")
        return implementation
    backend = backend or jax.default_backend()
    if implementation == "pallas":
        if backend == "tpu" and "pallas_tpu" in available_implementations():
            return "pallas_tpu"
        return "pallas"
    if backend == "gpu" and gpu_supports_pallas():
        return "pallas"
    if backend == "tpu" and "pallas_tpu" in available_implementations():
        return "pallas_tpu"
    return "xla"


def _check_segments_and_slopes(batch_seq: tuple[int, ...], heads: int, segment_ids: jax.Array,
                               alibi_slopes: jax.Array) -> None:
    if segment_ids.shape != batch_seq:
        raise ValueError(f"segment_ids shape {segment_ids.shape} does not match "
                         f"[batch, seq] = {batch_seq}")
    if jnp.shape(alibi_slopes) != (heads,):
        raise ValueError(f"alibi_slopes shape {jnp.shape(alibi_slopes)} does not match "
                         f"heads = {heads}")


def _call(fn: AttentionFn, name: str, args: tuple, window: int) -> jax.Array:
    """fn(*args), with the window keyword only for window > 0 (if fn takes one)."""
    if not window:
        return fn(*args)
    if not _accepts_window(fn):
        raise ValueError(f"attention implementation {name!r} has no sliding window (window="
                         f"{window}); use one of {window_implementations()} or window=0")
    return fn(*args, window=window)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
              alibi_slopes: jax.Array, implementation: str = "auto",
              scale: Optional[float] = None, window: int = 0) -> jax.Array:
    """softmax(q k^T * scale - slope_h |i - j|, masked to same-segment non-pad keys) v.

    q, k, v: [batch, seq, heads, head_dim]; segment_ids: [batch, seq] ints, 0 = padding;
    alibi_slopes: [heads]. Query rows with no visible key (padding) return zeros.
    window: a static Python int; 0 = full attention, w > 0 = keys with |i - j| <= w only.
    """
    window = check_window(window)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one [batch, seq, heads, head_dim] shape; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    _check_segments_and_slopes(q.shape[:2], q.shape[2], segment_ids, alibi_slopes)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = resolve_implementation(implementation)
    fn = _load(name)
    args = (q, k, v, segment_ids.astype(jnp.int32), jnp.asarray(alibi_slopes, jnp.float32),
            scale)
    return _call(fn, name, args, window)


def attention_qkv(qkv: jax.Array, segment_ids: jax.Array, alibi_slopes: jax.Array,
                  implementation: str = "auto", scale: Optional[float] = None,
                  window: int = 0, bias: Optional[jax.Array] = None) -> jax.Array:
    """attention() of the fused projection qkv [batch, seq, 3, heads, head_dim], whose slots
    0, 1, 2 are q, k, v -> [batch, seq, heads, head_dim].

    Implementations with a fused-QKV entry (qkv_implementations()) read the slots in place
    and give d(qkv) as one array; the others get qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2].
    bias: the projection's bias [3 * heads * head_dim], not yet added to qkv. The fused
    entries add it as they read q, k, v (no pass over qkv of its own); for the others it is
    added here, in qkv's dtype.
    """
    window = check_window(window)
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv shape {qkv.shape} must be [batch, seq, 3, heads, head_dim] "
                         "(q, k, v in slots 0, 1, 2); for separate arrays use attention()")
    if bias is not None:
        check_qkv_bias(bias, *qkv.shape[3:])
    name = resolve_implementation(implementation)
    fn = _load_qkv(name)
    if fn is None:
        if bias is not None:
            qkv = qkv + jnp.reshape(bias, qkv.shape[2:]).astype(qkv.dtype)
        return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], segment_ids, alibi_slopes,
                         name, scale, window)
    _check_segments_and_slopes(qkv.shape[:2], qkv.shape[3], segment_ids, alibi_slopes)
    if scale is None:
        scale = qkv.shape[-1] ** -0.5
    args = (qkv, segment_ids.astype(jnp.int32), jnp.asarray(alibi_slopes, jnp.float32), scale)
    if bias is not None:
        fn = functools.partial(fn, bias=bias)
    return _call(fn, name, args, window)


__all__ = ["alibi_slopes", "attention", "attention_qkv", "available_implementations",
           "gpu_supports_pallas", "qkv_implementations", "register_implementation",
           "resolve_implementation", "window_implementations", "xla_attention"]
