"""Long-context measurements (issue 19): speed and memory, ALiBi extrapolation, windowed loss.

  PYTHONPATH=. python benchmarks/long_context.py speed --json /tmp/speed.json
  PYTHONPATH=. python benchmarks/long_context.py extrapolation --params /runs/ttq128 \
      --rows /work/main/.ttq/long_rows.npz
  PYTHONPATH=. python benchmarks/long_context.py window-loss --rows /work/main/.ttq/long_rows.npz

speed: the trainer's bf16 train step (train_throughput.time_train_step) at equal tokens per
batch, full and sliding-window attention, each case in its own process so peak memory is its
own, beside transformers' ModernBERT-base (SDPA, torch.compile, fused AdamW, sparse prediction),
then the GPU-hours of each phase-2 recipe at the measured full-attention speed.
extrapolation: a 128-token model's eval loss at 128-1024 tokens on the SAME masked tokens.
window-loss: full vs windowed attention trained from scratch on the same long-document rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import time_to_quality as ttq  # noqa: E402  (masking, rows, the TTQ train loop)

RESULT_PREFIX = "LONGCTX_RESULT "
DEFAULT_CASES = "512:128,1024:64,2048:32,8192:8"   # 65,536 tokens per batch each
PHASE2_LENGTHS = (512, 1024, 2048)


# ---------------------------------------------------------------- speed


def parse_cases(text: str) -> list[tuple[int, int]]:
    """'512:128,1024:64' -> [(512, 128), (1024, 64)] (seq_len, batch)."""
    try:
        cases = [(int(s), int(b)) for s, b in (c.split(":") for c in text.split(","))]
    except ValueError:
        raise SystemExit(f"error: --cases {text!r} is not a comma list of seq_len:batch, "
                         f"e.g. {DEFAULT_CASES}")
    return cases


def peak_device_bytes() -> int | None:
    """Peak bytes the first local device's allocator has held, None where not reported (CPU)."""
    import jax
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def run_speed_case(args) -> dict:
    """One of our cases, in this (child) process: train_throughput's timing plus peak memory."""
    from mosaicbert_jax.xla_flags import apply_gpu_defaults
    apply_gpu_defaults()
    import jax
    from mosaicbert_jax.training.flops import peak_tflops
    from train_throughput import time_train_step

    overrides = {"attention_window": args.window, "global_attention_every": args.global_every}
    r = time_train_step(args.preset, args.seq, args.batch, args.attention,
                        {"data": 1, "fsdp": -1, "tensor": 1}, args.steps, 1, False, 0,
                        devices=jax.devices()[:1], model_overrides=overrides)
    peak = peak_tflops(jax.devices()[0])
    r.update(variant=args.variant, window=args.window, global_every=args.global_every,
             tokens_per_s=r["tokens_per_s_per_device"], peak_bytes=peak_device_bytes(),
             mfu=r["tokens_per_s_per_device"] * r["flops_per_token"] / (peak * 1e12)
             if peak else None)
    return r


PEER_SNIPPET = r"""
import json, sys, time, torch
from transformers import ModernBertConfig, ModernBertForMaskedLM
seq, batch, steps, warmup = (int(x) for x in sys.argv[1:5])
compile_model, overrides = sys.argv[5] == "1", json.loads(sys.argv[6])
dev = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: only to smoke-test this script
values = dict(max_position_embeddings=max(8192, seq), sparse_prediction=True,
              reference_compile=False, attn_implementation="sdpa")
values.update(overrides)
cfg = ModernBertConfig(**values)   # the defaults are ModernBERT-base
model = ModernBertForMaskedLM(cfg).to(dev).train()
if compile_model:
    model = torch.compile(model)
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                        weight_decay=1e-5, fused=dev == "cuda")
g = torch.Generator(device=dev).manual_seed(0)
ids = torch.randint(5, cfg.vocab_size, (batch, seq), device=dev, generator=g)
labels = torch.where(torch.rand((batch, seq), device=dev, generator=g) < 0.3, ids, -100)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
def step():
    with torch.autocast(dev, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss
t = time.perf_counter(); step(); sync(); compile_s = time.perf_counter() - t
for _ in range(warmup): step()
sync()
times = []
for _ in range(3):
    t = time.perf_counter()
    for _ in range(steps): loss = step()
    sync(); times.append((time.perf_counter() - t) / steps)
times.sort()
loss = float(loss)
if loss != loss:
    raise SystemExit(f"non-finite ModernBERT loss at {seq}x{batch}")
print("LONGCTX_RESULT " + json.dumps({
    "seq_len": seq, "batch": batch, "step_ms": times[1] * 1e3,
    "tokens_per_s": batch * seq / times[1], "compile_s": compile_s, "loss": loss,
    "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
    "params": sum(p.numel() for p in model.parameters()), "compiled": compile_model}))
"""


def run_child(command: list[str], timeout: int, what: str) -> dict | None:
    """Runs one case in its own process; its last result line, or None (reported) on failure."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{what}: TIMED OUT after {timeout} s", flush=True)
        return None
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        print(f"{what}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def phase2_gpu_hours(full_tokens_per_s: dict[int, float], gpus: int = 8) -> list[dict]:
    """Tokens of each phase-2 config (steps x global batch x seq_len, from the real configs) over
    our measured full-attention tokens/s at that length: hours on one GPU, and on `gpus`
    assuming linear scaling."""
    from mosaicbert_jax.training.defaults import get_phase2_config
    out = []
    for seq_len in PHASE2_LENGTHS:
        config = get_phase2_config(seq_len)
        tokens = config.train.steps * config.train.global_batch_size * config.data.seq_len
        rate = full_tokens_per_s.get(seq_len)
        hours = tokens / rate / 3600 if rate else None
        out.append({"config": f"configs/phase2_{seq_len}.py", "seq_len": seq_len,
                    "tokens": tokens, "tokens_per_s": rate, "gpu_hours": hours,
                    f"wall_hours_{gpus}_gpus": hours / gpus if hours else None})
    return out


def speed_report(args) -> dict:
    """The speed tables again from one or more `speed --json` files (e.g. cases split over
    two runs), so the GPU-hours table sees every length."""
    ours, peer, cases, first = {}, {}, [], None
    for path in args.inputs:
        with open(path) as f:
            data = json.load(f)
        first = first or data
        for r in data["ours"]:
            ours[(r["seq_len"], r["variant"])] = r
            if (r["seq_len"], r["batch_per_device"]) not in cases:
                cases.append((r["seq_len"], r["batch_per_device"]))
        for r in data["peer"]:
            peer[r["seq_len"]] = r
            if (r["seq_len"], r["batch"]) not in cases:
                cases.append((r["seq_len"], r["batch"]))
    if first is None:
        raise SystemExit("error: speed-report needs at least one speed --json file")
    return print_speed_report(ours, peer, sorted(cases), first["window"],
                              first["global_every"], args.gpus, first["peer_compiled"])


def _fmt_rate(r: dict | None) -> str:
    if not r:
        return "- | -"
    gb = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "-"
    return f"{r['tokens_per_s']:,.0f} | {gb}"


def _case_line(what: str, r: dict) -> str:
    """One case as printed the moment it ends (with its peak memory), so a run cut short
    still leaves every finished case in its log."""
    gib = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r.get("peak_bytes") else "peak memory -"
    return (f"{what}: {r['step_ms']:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, {gib}, "
            f"compile {r['compile_s']:.0f} s")


def speed(args) -> dict:
    cases = parse_cases(args.cases)
    script = os.path.abspath(__file__)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in ("full", "windowed"):
            raise SystemExit(f"error: --variants {v!r} is not full or windowed")
    ours, peer = {}, {}
    for seq, batch in cases:
        for variant in variants:
            window, every = (args.window, args.global_every) if variant == "windowed" else (0, 0)
            command = [sys.executable, script, "_speed-case", "--seq", str(seq), "--batch",
                       str(batch), "--preset", args.preset, "--attention", args.attention,
                       "--steps", str(args.steps), "--window", str(window), "--global-every",
                       str(every), "--variant", variant]
            r = run_child(command, args.case_timeout, f"ours {variant} {seq}x{batch}")
            if r:
                ours[(seq, variant)] = r
                print(_case_line(f"ours {variant} {seq}x{batch}", r), flush=True)
        if args.peer:
            command = [sys.executable, "-c", PEER_SNIPPET, str(seq), str(batch), str(args.steps),
                       str(args.peer_warmup), "0" if args.peer_eager else "1",
                       args.peer_config or "{}"]
            r = run_child(command, args.case_timeout, f"ModernBERT {seq}x{batch}")
            if r:
                peer[seq] = r
                print(_case_line(f"ModernBERT {seq}x{batch}", r), flush=True)
    return print_speed_report(ours, peer, cases, args.window, args.global_every, args.gpus,
                              compiled=not args.peer_eager)


def print_speed_report(ours: dict, peer: dict, cases: list[tuple[int, int]], window: int,
                       global_every: int, gpus: int, compiled: bool = True) -> dict:
    """The speed tables and the phase-2 GPU-hours from measured cases (ours keyed by
    (seq_len, variant), peer by seq_len); returns everything for --json."""
    window_text = f"window {window}, global every {global_every} layers"
    print(f"\n| seq x batch | ours full tok/s | GiB | ours windowed ({window_text}) tok/s | GiB | "
          f"ModernBERT-base{' compiled' if compiled else ''} tok/s | GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seq, batch in cases:
        print(f"| {seq} x {batch} | {_fmt_rate(ours.get((seq, 'full')))} | "
              f"{_fmt_rate(ours.get((seq, 'windowed')))} | {_fmt_rate(peer.get(seq))} |")
    print("\n| seq x batch | variant | step ms | MFU (model FLOPs of full attention) |")
    print("| --- | --- | --- | --- |")
    for (seq, variant), r in sorted(ours.items()):
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        print(f"| {seq} x {r['batch_per_device']} | {variant} | {r['step_ms']:.1f} | {mfu} |")
    full = {seq: r["tokens_per_s"] for (seq, variant), r in ours.items() if variant == "full"}
    hours = phase2_gpu_hours(full, gpus)
    print(f"\n| phase-2 config | tokens | our full tok/s at that length | GPU-hours (1 GPU) | "
          f"hours on {gpus} GPUs (linear) |")
    print("| --- | --- | --- | --- | --- |")
    for h in hours:
        rate = f"{h['tokens_per_s']:,.0f}" if h["tokens_per_s"] else "not measured"
        one = f"{h['gpu_hours']:.1f}" if h["gpu_hours"] else "-"
        many = h[f"wall_hours_{gpus}_gpus"]
        print(f"| {h['config']} | {h['tokens'] / 1e9:.2f}B | {rate} | {one} | "
              f"{f'{many:.2f}' if many else '-'} |")
    return {"ours": [dict(r) for r in ours.values()], "peer": list(peer.values()),
            "phase2": hours, "window": window, "global_every": global_every,
            "peer_compiled": compiled}


# ---------------------------------------------------------------- masked rows cut to lengths


def mask_slots(seq_len: int, prob: float) -> int:
    """Mask slots per row that hold Bernoulli(prob) masking of seq_len tokens but for a
    six-sigma tail (a multiple of 8, at most seq_len)."""
    mean = seq_len * prob
    slots = mean + 6 * math.sqrt(mean * (1 - prob)) + 1
    return min(seq_len, int(math.ceil(slots / 8) * 8))


def cut_masked(masked: np.ndarray, dense_labels: np.ndarray, length: int):
    """Masked rows [n, R] and their labels cut into [n * R / length, length] pieces, so every
    length scores exactly the same masked tokens (with less context for shorter pieces)."""
    rows, full = masked.shape
    if full % length:
        raise SystemExit(f"error: length {length} does not divide the rows' {full} tokens; "
                         f"pick lengths that divide it (e.g. 128,256,512,1024)")
    ids = masked.reshape(-1, length)
    dense = dense_labels.reshape(-1, length)
    slots = max(8, int(math.ceil(max(1, (dense >= 0).sum(1).max()) / 8) * 8))
    return (ids,) + ttq.sparse_targets(dense, slots) + (dense,)


def load_long_rows(path: str, key: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise SystemExit(f"error: --rows {path} not found; build it with "
                         f"benchmarks/make_long_rows.py (docs/long_context.md)")
    with np.load(path) as data:
        if key not in data:
            raise SystemExit(f"error: --rows {path} has no {key!r} rows; rebuild it with "
                             f"benchmarks/make_long_rows.py")
        return data[key]


# ---------------------------------------------------------------- extrapolation


def extrapolation(args) -> dict:
    from mosaicbert_jax.xla_flags import apply_gpu_defaults
    apply_gpu_defaults()
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from mosaicbert_jax import MosaicBertForMaskedLM
    from mosaicbert_jax.checkpoint import load_pretrained
    from mosaicbert_jax.sharding import batch_sharding, make_mesh
    from mosaicbert_jax.training.step import make_eval_step

    lengths = [int(x) for x in args.lengths.split(",")]
    rows = load_long_rows(args.rows, "eval")
    if args.eval_rows:
        rows = rows[:args.eval_rows]
    masked, _, _, _, dense = ttq.mask_rows(rows, 0.15, args.seed, slots=rows.shape[1])
    params, cfg = load_pretrained(args.params)
    model = MosaicBertForMaskedLM(cfg)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    eval_fn = make_eval_step(model, mesh, jax.tree.map(lambda _: replicated, params))
    data = batch_sharding(mesh)
    table = []
    for length in lengths:
        ids, positions, weights, labels, _ = cut_masked(masked, dense, length)
        batch = max(1, args.tokens_per_batch // length)
        sums = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
        start = time.perf_counter()
        for i in range(0, len(ids), batch):
            take = slice(i, i + batch)
            pad = batch - len(ids[take])  # the last batch padded with unscored rows: one shape
            part = {"input_ids": ids[take], "segment_ids": np.ones_like(ids[take]),
                    "masked_positions": positions[take], "masked_weights": weights[take],
                    "masked_labels": labels[take]}
            part = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in part.items()}
            out = jax.device_get(eval_fn(params, jax.device_put(part, data)))
            for k in sums:
                sums[k] += float(out[k])
        entry = {"length": length, "loss": sums["loss_sum"] / sums["weight_sum"],
                 "accuracy": sums["correct_sum"] / sums["weight_sum"],
                 "masked_tokens": int(sums["weight_sum"]), "pieces": len(ids),
                 "seconds": time.perf_counter() - start}
        table.append(entry)
        print(json.dumps(entry), flush=True)
    print(f"\nALiBi extrapolation: {args.params}, {len(rows)} rows of {rows.shape[1]} tokens "
          f"masked once (15%, seed {args.seed}), cut into pieces of L")
    print("\n| L | eval loss | accuracy | masked tokens |")
    print("| --- | --- | --- | --- |")
    for e in table:
        print(f"| {e['length']} | {e['loss']:.4f} | {e['accuracy']:.2%} | {e['masked_tokens']:,} |")
    if len({e["masked_tokens"] for e in table}) != 1:
        raise SystemExit("error: the lengths scored different masked tokens")
    return {"params": args.params, "rows": len(rows), "table": table}


# ---------------------------------------------------------------- window-loss


class LongRows(ttq.Rows):
    """time_to_quality's Rows over long-document rows: train rows cut to seq_len, the eval
    rows (held-out documents) cut to seq_len, mask slots sized for the length."""

    def __init__(self, train_rows: np.ndarray, eval_rows: np.ndarray, seq_len: int,
                 batch: int, max_train_rows: int = 0):
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            if rows.shape[1] % seq_len:
                raise SystemExit(f"error: --seq-len {seq_len} does not divide the {name} rows' "
                                 f"{rows.shape[1]} tokens; use a divisor (e.g. 512)")
        self.seq_len, self.batch = seq_len, batch
        self.train_slots = mask_slots(seq_len, 0.3)
        self.eval_slots = mask_slots(seq_len, 0.15)
        self.train_rows = train_rows.reshape(-1, seq_len)
        if max_train_rows:
            self.train_rows = self.train_rows[:max_train_rows]
        self.eval_rows = eval_rows.reshape(-1, seq_len)
        usable = len(self.eval_rows) // batch * batch
        if usable == 0 or len(self.train_rows) < batch:
            raise SystemExit(f"error: fewer rows than one batch of {batch} (train "
                             f"{len(self.train_rows)}, eval {len(self.eval_rows)}); lower --batch")
        self.eval_rows = self.eval_rows[:usable]
        self.eval_batches = [ttq.mask_rows(self.eval_rows[i:i + batch], 0.15, 10_000 + i,
                                           slots=self.eval_slots)
                             for i in range(0, usable, batch)]


def window_loss(args) -> dict:
    train_rows = load_long_rows(args.rows, "train")
    eval_rows = load_long_rows(args.rows, "eval")
    rows = LongRows(train_rows, eval_rows, args.seq_len, args.batch, args.max_train_rows)
    epochs = args.steps * args.batch / len(rows.train_rows)
    print(f"window-loss: {len(rows.train_rows)} train rows x {args.seq_len} ({epochs:.1f} epochs "
          f"in {args.steps} steps), {len(rows.eval_rows)} eval rows", flush=True)
    results = []
    for variant in ("full", "windowed"):
        model = dict(attention_window=args.window, global_attention_every=args.global_every) \
            if variant == "windowed" else {}
        if args.preset != "base":
            model["preset"] = args.preset
        run_args = argparse.Namespace(
            side=f"jax-{variant}", steps=args.steps, batch=args.batch, lr=args.lr,
            eval_every=args.eval_every or args.steps, jax_model=model,
            save_params="")
        r = ttq.run_jax(run_args, rows)
        r.update(variant=variant, final_loss=r["evals"][-1]["loss"],
                 final_accuracy=r["evals"][-1]["accuracy"])
        results.append(r)
    print(f"\n| attention (seq {args.seq_len}, {args.steps} steps x {args.batch}) | eval loss | "
          f"accuracy | train s | tokens/s | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        name = "full" if r["variant"] == "full" else (
            f"windowed ({args.window}, global every {args.global_every})")
        print(f"| {name} | {r['final_loss']:.4f} | {r['final_accuracy']:.2%} | "
              f"{r['train_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['compile_s']:.1f} |")
    return {"runs": results, "train_rows": len(rows.train_rows), "epochs": epochs}


# ---------------------------------------------------------------- command line


def add_window_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=int, default=64,
                        help="windowed: keys within this many tokens each side (64 = "
                             "ModernBERT's 128-token local window)")
    parser.add_argument("--global-every", type=int, default=3,
                        help="windowed: layers 0, n, 2n, ... stay global (ModernBERT: 3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("speed", help="tokens/s and peak memory, ours full/windowed and ModernBERT")
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma list of seq_len:batch")
    p.add_argument("--variants", default="full,windowed")
    p.add_argument("--preset", default="base")
    p.add_argument("--attention", default="auto")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per repeat (3 repeats, after 3 warmup steps)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="time transformers ModernBERT-base beside ours")
    p.add_argument("--peer-eager", action="store_true", help="ModernBERT without torch.compile")
    p.add_argument("--peer-warmup", type=int, default=3)
    p.add_argument("--peer-config", default="",
                   help="JSON ModernBertConfig overrides (tests use a tiny one)")
    p.add_argument("--gpus", type=int, default=8, help="GPU count for the wall-clock estimate")
    p.add_argument("--case-timeout", type=int, default=420)
    add_window_flags(p)

    p = sub.add_parser("speed-report", help="the speed tables from saved speed --json files")
    p.add_argument("inputs", nargs="+", help="speed --json files")
    p.add_argument("--gpus", type=int, default=8)

    p = sub.add_parser("_speed-case", help=argparse.SUPPRESS)  # one of our cases, in a child
    for name in ("--seq", "--batch", "--steps", "--window", "--global-every"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--attention", required=True)
    p.add_argument("--variant", required=True)

    p = sub.add_parser("extrapolation", help="a short-trained model's eval loss at longer lengths")
    p.add_argument("--params", required=True,
                   help="a checkpoint load_pretrained reads (time_to_quality --save-params)")
    p.add_argument("--rows", default=".ttq/long_rows.npz")
    p.add_argument("--lengths", default="128,256,512,1024")
    p.add_argument("--eval-rows", type=int, default=0, help="0: all eval rows")
    p.add_argument("--tokens-per-batch", type=int, default=32768)
    p.add_argument("--seed", type=int, default=20_000)

    p = sub.add_parser("window-loss", help="full vs windowed attention trained on the same rows")
    p.add_argument("--rows", default=".ttq/long_rows.npz")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-4, help="time_to_quality's")
    p.add_argument("--eval-every", type=int, default=0, help="0: only at the start and the end")
    p.add_argument("--max-train-rows", type=int, default=0, help="0: all")
    p.add_argument("--preset", default="base")
    add_window_flags(p)
    for name in ("speed", "speed-report", "extrapolation", "window-loss"):
        sub.choices[name].add_argument("--json", default="",
                                       help="also write everything to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "_speed-case":
        print(RESULT_PREFIX + json.dumps(run_speed_case(args)), flush=True)
        return
    result = {"speed": speed, "speed-report": speed_report, "extrapolation": extrapolation,
              "window-loss": window_loss}[args.command](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
