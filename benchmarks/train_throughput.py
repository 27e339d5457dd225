"""Training throughput of MosaicBERT on the GPUs present, beside a PyTorch reference point.

Times the trainer's own jitted train step (training/step.py with the recipe optimizer of
configs/base.py, overriding only the model preset, attention, dropout RNG, remat, sequence
length, batch, mesh and microbatches) on the trainer's synthetic batches; reports tokens/s
per device, step time and MFU against the bf16 matmul ceiling that this same run measures. Then (unless --no-torch) times transformers'
BertForMaskedLM (bf16 autocast, SDPA) at the same batch in a subprocess.

  PYTHONPATH=. python benchmarks/train_throughput.py --cases base:128:256,base:512:64
--precision bf16,fp8 (or --fp8) times each case with the FP8 GEMMs (model.fp8) beside bf16;
fp8-<gemm> (fp8-f8, fp8-qdq, fp8-mlp, fp8-mlp_qkv, fp8-encoder: fp8.GEMMS) pins model.fp8_gemm
("fp8" takes the default, "encoder"; see mosaicbert_jax/fp8.py). A precision may end in
+field=int model overrides (bool fields 0/1), e.g. fp8+fp8_qkv_grad_in_attention=0 times the FP8
model with d(qkv) quantised by its own pass, beside fp8.
On several GPUs, --scaling times each case on one GPU and then on all of them with a
data-parallel and an FSDP mesh, and prints per-GPU throughput and scaling efficiency.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_jax.data.training_data import make_training_data
from mosaicbert_jax.field_overrides import parse_field_overrides
from mosaicbert_jax.fp8 import GEMMS as FP8_GEMMS
from mosaicbert_jax.optim import recipe_optimizer
from mosaicbert_jax.sharding import batch_sharding, make_mesh
from mosaicbert_jax.train import model_config_from
from mosaicbert_jax.training.flops import training_flops_per_token
from mosaicbert_jax.training.step import init_state, make_train_step
from mosaicbert_jax.xla_flags import apply_gpu_defaults

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_tiles import add_tile_flags, apply_tile_flags  # noqa: E402

RECIPE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "base.py")


def matmul_ceiling_tflops(n: int = 8192, reps: int = 20) -> float:
    """Median bf16 n^3 matmul rate through JAX on random data."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(times)) / 1e12


def recipe_config(preset: str, seq_len: int, global_batch: int, attention: str,
                  mesh_axes: dict, microbatches: int = 1, remat: bool = False,
                  mean_doc_len: int = 0, dropout_rng: str = "hash",
                  fused: str = "auto",
                  model_overrides: dict | None = None) -> ml_collections.ConfigDict:
    """configs/base.py (the recipe) with only what a benchmark varies overridden
    (model_overrides: further config.model keys, e.g. attention_window or fp8)."""
    spec = importlib.util.spec_from_file_location("recipe_config", RECIPE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.preset = preset
    config.model.attention_implementation = attention
    config.model.dropout_rng = dropout_rng
    config.model.remat = remat
    config.model.glu_implementation = fused
    config.model.layernorm_implementation = fused
    config.model.mlm_loss_implementation = fused
    config.data.source = "synthetic"
    config.data.seq_len = seq_len
    config.data.synthetic_mean_doc_len = mean_doc_len
    config.train.global_batch_size = global_batch
    config.train.microbatches = microbatches
    config.mesh.update(mesh_axes)
    unknown = sorted(set(model_overrides or {}) - set(config.model))
    if unknown:  # config.model.update would add them unread
        raise ValueError(f"model overrides {unknown} are not keys of config.model")
    config.model.update(model_overrides or {})
    return config


def build_train_step(preset: str, seq_len: int, batch_per_device: int, attention: str,
                     mesh_axes: dict, microbatches: int = 1, remat: bool = False,
                     mean_doc_len: int = 0, dropout_rng: str = "hash", devices=None,
                     fused: str = "auto", model_overrides: dict | None = None):
    """The trainer's jitted train step for a preset, its initial state and 4 sharded batches,
    built as train.py builds them from the recipe config. `fused` sets the fused-op switches
    (model.glu_implementation, layernorm_implementation, mlm_loss_implementation)."""
    mesh = make_mesh(mesh_axes, devices)
    global_batch = batch_per_device * mesh.devices.size
    config = recipe_config(preset, seq_len, global_batch, attention, mesh_axes, microbatches,
                           remat, mean_doc_len, dropout_rng, fused, model_overrides)
    tc = config.train
    data = make_training_data(config.data, global_batch, tc.seed, 0, 1, config.model.vocab_size)
    cfg = model_config_from(config, data.vocab_size)
    model = MosaicBertForMaskedLM(cfg)
    schedule, tx = recipe_optimizer(config.optimizer, tc.steps)
    state, shardings = init_state(model, tx, tc.seed, mesh)
    step = make_train_step(model, tx, schedule, mesh, shardings, tc.microbatches,
                           dropout_seed=tc.seed)
    batches = [jax.device_put(next(data.train), batch_sharding(mesh)) for _ in range(4)]
    return step, state, batches, cfg, mesh


def split_precision(precision: str) -> tuple[str, dict]:
    """'fp8+field=1+other=0' -> ('fp8', {field: True, other: False}): the precision and the
    MosaicBertConfig overrides after it (a bad one raises a one-line ValueError)."""
    base, *items = precision.split("+")
    return base, parse_field_overrides(",".join(items), MosaicBertConfig, "precision override")


def time_train_step(preset: str, seq_len: int, batch_per_device: int, attention: str,
                    mesh_axes: dict, steps: int, microbatches: int, remat: bool,
                    mean_doc_len: int, dropout_rng: str = "hash", devices=None,
                    fused: str = "auto", model_overrides: dict | None = None,
                    precision: str = "bf16") -> dict:
    """`precision` fp8 sets model.fp8 (the FP8 GEMMs; fp8-<gemm>: with that model.fp8_gemm),
    over model_overrides."""
    precision, overrides = split_precision(precision)
    model_overrides = {**(model_overrides or {}), **overrides,
                       "fp8": precision.startswith("fp8")}
    if precision.startswith("fp8-"):
        model_overrides["fp8_gemm"] = precision[len("fp8-"):]
    step, state, batches, cfg, mesh = build_train_step(
        preset, seq_len, batch_per_device, attention, mesh_axes, microbatches, remat,
        mean_doc_len, dropout_rng, devices, fused, model_overrides)
    n_dev = mesh.devices.size
    global_batch = batch_per_device * n_dev
    t0 = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for i in range(3):
        state, metrics = step(state, batches[i % 4])
    jax.block_until_ready(metrics)
    times = []
    for rep in range(3):
        t = time.perf_counter()
        for i in range(steps):
            state, metrics = step(state, batches[i % 4])
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t) / steps)
    step_s = float(np.median(times))
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss} for {preset}:{seq_len}")
    tokens_per_s = global_batch * seq_len / step_s
    return {"preset": preset, "seq_len": seq_len, "batch_per_device": batch_per_device,
            "devices": n_dev, "attention": attention, "dropout_rng": dropout_rng, "fused": fused,
            "precision": precision,
            "mesh": dict(mesh.shape), "step_ms": step_s * 1e3,
            "tokens_per_s_per_device": tokens_per_s / n_dev,
            "flops_per_token": training_flops_per_token(cfg, seq_len, 0.3),
            "compile_s": compile_s, "loss": loss, "spread_ms": (max(times) - min(times)) * 1e3}


TORCH_SNIPPET = r"""
import json, sys, time, torch
from transformers import BertConfig, BertForMaskedLM
preset, seq, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
compile_model = sys.argv[5] == "1"
sizes = dict(base=(768, 12, 12, 3072), large=(1024, 24, 16, 4096))[preset]
cfg = BertConfig(vocab_size=30528, hidden_size=sizes[0], num_hidden_layers=sizes[1],
                 num_attention_heads=sizes[2], intermediate_size=sizes[3],
                 max_position_embeddings=max(512, seq), attn_implementation="sdpa")
model = BertForMaskedLM(cfg).cuda().train()
if compile_model:
    model = torch.compile(model)
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                        weight_decay=1e-5, fused=True)
g = torch.Generator(device="cuda").manual_seed(0)
ids = torch.randint(5, 30528, (batch, seq), device="cuda", generator=g)
labels = torch.where(torch.rand((batch, seq), device="cuda", generator=g) < 0.3, ids, -100)
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss
for _ in range(5): step()
torch.cuda.synchronize()
times = []
for _ in range(3):
    t = time.perf_counter()
    for _ in range(steps): loss = step()
    torch.cuda.synchronize(); times.append((time.perf_counter() - t) / steps)
times.sort()
print("TORCH_RESULT " + json.dumps({"step_ms": times[1] * 1e3,
      "tokens_per_s": batch * seq / times[1], "loss": float(loss)}))
"""


def time_torch_reference(preset: str, seq_len: int, batch: int, steps: int,
                         compile_model: bool = True) -> dict | None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    try:
        out = subprocess.run([sys.executable, "-c", TORCH_SNIPPET, preset, str(seq_len),
                              str(batch), str(steps), "1" if compile_model else "0"],
                             capture_output=True, text=True, timeout=480, env=env)
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.splitlines():
        if line.startswith("TORCH_RESULT "):
            return json.loads(line[len("TORCH_RESULT "):])
    print("torch reference failed:", out.stderr[-2000:], file=sys.stderr)
    return None


def parse_mesh(text: str) -> dict:
    return {k: int(v) for k, v in (x.split("=") for x in text.split(","))}


def print_scaling(rows: list[dict]) -> None:
    """Per-device throughput of each multi-device mesh as a share of the 1-device run."""
    print("\n| model | seq | batch/dev | attention | mesh | devices | tokens/s/dev | "
          "scaling efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    key = lambda r: (r["preset"], r["seq_len"], r["batch_per_device"], r["attention"],
                     r["dropout_rng"])
    single = {key(r): r for r in rows if r["mesh_name"] == "1 device"}
    for r in rows:
        base = single.get(key(r))
        share = (f"{r['tokens_per_s_per_device'] / base['tokens_per_s_per_device']:.1%}"
                 if base else "-")
        print(f"| {r['preset']} | {r['seq_len']} | {r['batch_per_device']} | {r['attention']} "
              f"| {r['mesh_name']} | {r['devices']} | {r['tokens_per_s_per_device']:,.0f} | "
              f"{share} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="base:128:256,base:512:64",
                        help="comma list of preset:seq_len:batch_per_device")
    parser.add_argument("--attention", default="auto", help="comma list of implementations")
    parser.add_argument("--dropout-rng", default="hash", help="comma list: hash, threefry")
    parser.add_argument("--fused", default="auto",
                        help="comma list of fused-op implementations: auto, xla, pallas")
    add_tile_flags(parser)
    parser.add_argument("--precision", default="bf16",
                        help="comma list: bf16 (the default model), fp8 (model.fp8: FP8 GEMMs), "
                             + ", ".join(f"fp8-{g}" for g in FP8_GEMMS)
                             + " (the same with that model.fp8_gemm)")
    parser.add_argument("--fp8", action="store_true", help="shorthand for --precision bf16,fp8")
    parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
    parser.add_argument("--scaling", action="store_true",
                        help="time each case on 1 device, then on all with a data-parallel and "
                             "an FSDP mesh, and report per-device scaling efficiency")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--microbatches", type=int, default=1)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--mean-doc-len", type=int, default=0,
                        help="0: one document per row; else exponential doc lengths")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-eager", action="store_true",
                        help="time transformers BERT without torch.compile")
    parser.add_argument("--json", default="", help="also write results to this file")
    parser.add_argument("--no-xla-defaults", action="store_true",
                        help="leave XLA_FLAGS as given (default: add mosaicbert_jax.xla_flags)")
    args = parser.parse_args()
    if args.fp8:
        args.precision = "bf16,fp8"
    precisions = args.precision.split(",")
    known = ["bf16", "fp8"] + [f"fp8-{gemm}" for gemm in FP8_GEMMS]
    try:
        bases = {split_precision(p)[0] for p in precisions}
    except ValueError as e:
        parser.error(str(e))
    if bases - set(known):
        parser.error(f"--precision={args.precision}: use a comma list of {', '.join(known)} "
                     f"(each optionally +field=int)")
    if not args.no_xla_defaults:
        apply_gpu_defaults()  # what the train command runs with
    apply_tile_flags(parser, args)

    # The torch reference runs first, in its own process, before JAX takes the GPU memory.
    cases = [(p, int(s), int(b)) for p, s, b in (c.split(":") for c in args.cases.split(","))]
    torch_results = {}
    if not args.no_torch and jax.default_backend() == "gpu":
        for preset, seq, batch in cases:
            torch_results[(preset, seq, batch)] = time_torch_reference(
                preset, seq, batch, args.steps, not args.torch_eager)
    meshes = [(args.mesh, parse_mesh(args.mesh), None)]
    if args.scaling:
        meshes = [("1 device", parse_mesh("data=1,fsdp=1,tensor=1"), jax.devices()[:1]),
                  ("data parallel", parse_mesh("data=-1,fsdp=1,tensor=1"), None),
                  ("fsdp", parse_mesh("data=1,fsdp=-1,tensor=1"), None)]
    ceiling = matmul_ceiling_tflops() if jax.default_backend() != "cpu" else float("nan")
    device = jax.devices()[0].device_kind
    print(f"device: {jax.device_count()} x {device}, jax {jax.__version__}, "
          f"matmul ceiling {ceiling:.0f} TFLOP/s (bf16 8192^3, measured now)")
    rows = []
    for preset, seq, batch in cases:
        for attention, dropout_rng, fused, precision, (mesh_name, mesh_axes, devices) in (
                itertools.product(args.attention.split(","), args.dropout_rng.split(","),
                                  args.fused.split(","), precisions, meshes)):
            try:
                r = time_train_step(preset, seq, batch, attention, mesh_axes, args.steps,
                                    args.microbatches, args.remat, args.mean_doc_len,
                                    dropout_rng, devices, fused, precision=precision)
            except Exception as e:  # report and go on to the next case
                print(f"{preset}:{seq}:{batch} {attention} {dropout_rng} {fused} {precision}: "
                      f"FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            r["mesh_name"] = mesh_name
            r["mfu"] = r["tokens_per_s_per_device"] * r["flops_per_token"] / (ceiling * 1e12)
            ref = torch_results.get((preset, seq, batch))
            r["torch_tokens_per_s"] = ref["tokens_per_s"] if ref else None
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n| model | seq | batch/dev | attention | dropout | fused | precision | step ms | "
          f"tokens/s/dev | MFU (vs bf16 {ceiling:.0f}) | HF BERT torch"
          f"{'' if args.torch_eager else ' compiled'} tokens/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = r["torch_tokens_per_s"]
        ref_text = f"{ref:,.0f}" if ref else "-"
        ratio = f"{r['tokens_per_s_per_device'] / ref:.2f}x" if ref else "-"
        print(f"| {r['preset']} | {r['seq_len']} | {r['batch_per_device']} | {r['attention']} | "
              f"{r['dropout_rng']} | {r['fused']} | {r['precision']} | "
              f"{r['step_ms']:.1f} | {r['tokens_per_s_per_device']:,.0f} | {r['mfu']:.1%} | "
              f"{ref_text} | {ratio} |")
    if args.scaling:
        print_scaling(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "ceiling_tflops": ceiling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
