"""The jax-triton path on a machine without a GPU: the import guard names the install command,
the launch descriptions have the right shapes and grids, and, where Triton is installed,
the Triton-language kernels compile for sm_90 (H100) and compute the reference's output and
gradients in Triton's own interpreter. Running them through jax_triton.triton_call needs a
CUDA GPU: that is checked by benchmarks/attention.py --impls triton on the GPU machine.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import (ISSUE_14_DOCUMENT_LENGTHS, assert_matches_float64_reference,
                             fresh_rng, layout_from_lengths, random_inputs,
                             random_packed_layouts)
from mosaicbert_jax.attention import alibi_slopes, attention
from mosaicbert_jax.attention import triton_kernels
from mosaicbert_jax.attention.pallas_gpu import BlockSizes

SMALL_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=32,
                          block_q_dq=32, block_k_dq=16)
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
# Batches of random packed layouts each interpreter test checks (after the issue-14 layouts).
INTERPRETER_DRAWS = 2  # fresh layouts each run; 4 took 40 s a block setting on 2 cores


def _small_inputs(batch=2, seq=96, heads=3, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((batch, seq), np.int32)
    segment_ids[0, :40], segment_ids[0, 40:80] = 1, 2   # two documents, then padding
    segment_ids[-1, :70] = 1                              # one document, then padding
    q, k, v, d_out = (jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)),
                                  jnp.float32) for _ in range(4))
    return q, k, v, d_out, jnp.asarray(segment_ids)


def test_missing_jax_triton_is_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_triton", None)  # as if not installed
    q, k, v, _, segment_ids = _small_inputs()
    with pytest.raises(ImportError, match=r"pip install 'mosaicbert-jax\[triton\]'"):
        attention(q, k, v, segment_ids, alibi_slopes(3), implementation="triton")


def test_missing_triton_is_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "mosaicbert_jax.attention.triton_lang", raising=False)
    with pytest.raises(ImportError, match=r"mosaicbert-jax\[triton\].*importing triton failed"):
        triton_kernels.triton_language()


def test_launch_descriptions_cover_the_padded_sequence():
    q, k, v, d_out, segment_ids = _small_inputs()
    slopes = jnp.asarray(alibi_slopes(3))
    q, k, v, segment_ids, sizes = triton_kernels.prepare_inputs(q, k, v, segment_ids,
                                                                SMALL_BLOCKS)
    assert q.shape[1] == 96 and segment_ids.shape == (2, 96)  # 96 is a multiple of 32
    forward = triton_kernels.forward_launch(q, k, v, segment_ids, slopes, 0.25, sizes)
    assert forward.grid == (96 // 16, 2, 3)
    assert [s.shape for s in forward.out_shapes] == [q.shape, (2, 3, 96)]
    assert forward.constexprs["PRECISION"] == "ieee" and forward.constexprs["N_ROWS"] == 6
    plan = np.asarray(forward.inputs[-1])
    assert plan.shape == (2, 4, 6)
    # Row 0, query block 0 (tokens 0..15, document 1) visits key blocks 0..2 (tokens 0..47).
    assert tuple(plan[0, :2, 0]) == (0, 3)
    out = jnp.zeros(q.shape, q.dtype)
    lse = jnp.zeros((2, 3, 96), jnp.float32)
    dkdv, dq = triton_kernels.backward_launches(q, k, v, segment_ids, slopes, out, lse,
                                                jnp.pad(d_out, [(0, 0)] * 4), 0.25, sizes)
    assert dkdv.grid == (96 // 32, 2, 3) and dq.grid == (96 // 32, 2, 3)
    assert [s.shape for s in dkdv.out_shapes] == [k.shape, v.shape]
    assert np.asarray(dkdv.inputs[7]).shape == (2, 4, 3)  # plan over key blocks of 32


def test_unsupported_head_dim_is_a_clear_error():
    x = jnp.zeros((1, 16, 2, 48), jnp.float32)
    with pytest.raises(ValueError, match="head_dim=48"):
        triton_kernels.prepare_inputs(x, x, x, jnp.ones((1, 16), jnp.int32), None)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (the [triton] extra)")
def test_kernels_compile_for_h100():
    """Triton's real compiler (no GPU needed) turns every kernel into a cubin for sm_90."""
    result = subprocess.run([sys.executable, __file__, "compile"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cubin") == 3, result.stdout


@pytest.mark.skipif(not (HAS_TRITON and HAS_TORCH), reason="needs triton and torch")
@pytest.mark.parametrize("blocks", ["small_split", "small_masked", "default"])
def test_kernels_match_float64_reference_in_triton_interpreter(blocks):
    """Random packed layouts (and, first, the layouts of issue 14) of random lengths, forward
    and gradients against the float64 reference, in Triton's interpreter."""
    _, seed = fresh_rng()
    result = subprocess.run([sys.executable, __file__, "interpret", blocks, str(seed)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, f"seed {seed}: {result.stderr[-3000:]}"
    assert result.stdout.split() == ["checked", str(INTERPRETER_DRAWS + 1), "batches"]


# ----------------------------------------------------------------------------- subprocesses
# Run as scripts: TRITON_INTERPRET must be set before the kernels are decorated, and the
# compile check must not leave Triton state in the test process.


def _compile_for_h100() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lang = triton_kernels.triton_language()
    q, k, v, d_out, segment_ids = _small_inputs(batch=2, seq=512, heads=12, head_dim=64)
    q, k, v, d_out = (x.astype(jnp.bfloat16) for x in (q, k, v, d_out))
    sizes = BlockSizes()
    slopes = jnp.asarray(alibi_slopes(12))
    forward = triton_kernels.forward_launch(q, k, v, segment_ids, slopes, 0.125, sizes)
    lse = jnp.zeros((2, 12, 512), jnp.float32)
    launches = (forward, *triton_kernels.backward_launches(q, k, v, segment_ids, slopes, q, lse,
                                                           d_out, 0.125, sizes))
    for launch in launches:
        fn = getattr(lang, launch.kernel)
        arrays = [*launch.inputs, *launch.out_shapes]
        pointers = {name: "*" + _triton_dtype(x.dtype) for name, x in zip(fn.arg_names, arrays)}
        signature = {name: pointers.get(name, "constexpr") for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, constexprs=launch.constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=launch.num_warps,
                                               num_stages=launch.num_stages))
        kinds = "cubin" if compiled.asm.get("cubin") else "no-cubin"
        print(launch.kernel, kinds, "shared", compiled.metadata.shared)


def _triton_dtype(dtype) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int32": "i32"}[
        jnp.dtype(dtype).name]


def _interpret(blocks: str, seed: int) -> None:
    import dataclasses

    import torch
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        # numpy >= 2.4 refuses int() of a size-1 1-D array, which scalar loads are here.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    lang = triton_kernels.triton_language()

    def run(launch):
        inputs = [torch.from_numpy(np.array(x)) for x in launch.inputs]
        outputs = [torch.empty(s.shape, dtype=getattr(torch, jnp.dtype(s.dtype).name))
                   for s in launch.out_shapes]
        getattr(lang, launch.kernel)[launch.grid](*inputs, *outputs, **launch.constexprs)
        return [jnp.asarray(x.numpy()) for x in outputs]

    def outputs_and_grads(q, k, v, d_out, segment_ids, slopes, scale, sizes):
        seq = q.shape[1]
        q, k, v, segment_ids, sizes = triton_kernels.prepare_inputs(
            q, k, v, jnp.asarray(segment_ids), sizes)
        d_out = jnp.pad(d_out, [(0, 0), (0, q.shape[1] - seq), (0, 0), (0, 0)])
        out, lse = run(triton_kernels.forward_launch(q, k, v, segment_ids, slopes, scale,
                                                     sizes))
        dkdv, dq = triton_kernels.backward_launches(q, k, v, segment_ids, slopes, out, lse,
                                                    d_out, scale, sizes)
        dk, dv = run(dkdv)
        (dq,) = run(dq)
        return [x[:, :seq] for x in (out, dq, dk, dv)]

    sizes = {"small_split": SMALL_BLOCKS,
             "small_masked": dataclasses.replace(SMALL_BLOCKS, unmasked_interior=False),
             "default": None}[blocks]
    rng = np.random.default_rng(seed)
    heads, head_dim = 2, 16
    slopes, scale = jnp.asarray(alibi_slopes(heads)), head_dim ** -0.5
    issue_14 = np.stack([layout_from_lengths(lengths, 128)
                         for lengths in ISSUE_14_DOCUMENT_LENGTHS])
    layouts = [issue_14] + [random_packed_layouts(rng, 3, int(rng.integers(16, 161)))
                            for _ in range(INTERPRETER_DRAWS)]
    for draw, segment_ids in enumerate(layouts):
        q, k, v, d_out = random_inputs(len(segment_ids), segment_ids.shape[1], heads,
                                       head_dim, rng)
        got = outputs_and_grads(q, k, v, d_out, segment_ids, slopes, scale, sizes)
        assert_matches_float64_reference(
            got, segment_ids, q, k, v, d_out, slopes, scale,
            f"triton interpreter, {blocks} blocks, seed {seed}, draw {draw}, "
            f"seq {segment_ids.shape[1]}")
    print("checked", len(layouts), "batches")


if __name__ == "__main__":
    if sys.argv[1] == "compile":
        _compile_for_h100()
    else:
        _interpret(sys.argv[2], int(sys.argv[3]))
