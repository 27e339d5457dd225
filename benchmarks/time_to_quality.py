"""Time to quality: ours, the original PyTorch MosaicBERT and transformers BERT-base, side by side.

  PYTHONPATH=. python benchmarks/time_to_quality.py --reference-src ../shared/reference/mosaicml_bert

Each side trains MosaicBERT-base-sized models (BERT-base for transformers) in its own process
on the same GPU, on the SAME rows with the SAME masks (30% masking, 80/10/10, drawn here with
numpy from the step number) and the same recipe (decoupled AdamW (0.9, 0.98), eps 1e-6, wd 1e-5,
6% warmup, linear decay to 0.02x), and is evaluated every --eval-every steps on the same
held-out rows at 15% masking. Our side's train batches put the masked tokens of the whole batch
in one group of slots (--jax-slot-groups; as the original unpads them across the batch), so
rows with many masked tokens need no per-row slots sized for the worst row. Train seconds
exclude evaluation and compilation (the device is synced only around evals, so steps queue as
in training). The report gives eval loss against train seconds for each side and the train
time each needs to reach the original's final eval loss. Rows default to
../shared/data/ttq/rows.npy (uint16, 128 tokens, the first --eval-rows held out). Sides: jax
(ours, the trainer's own step), original (the reference code imported from --reference-src,
attention through torch SDPA with its ALiBi + padding bias, bf16 autocast), hfbert
(transformers BertForMaskedLM, SDPA, torch.compile), jax-fp8 (ours with model.fp8: FP8 GEMMs;
e.g. --sides jax,jax-fp8 for the parity check).
--save-params DIR saves our side's final params (save_pretrained) for
benchmarks/long_context.py extrapolation.
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

from kernel_tiles import add_tile_flags, apply_tile_flags

MASK_SLOTS = 64          # per 128-token row: 30% masking leaves ~38 +- 5 positions
FIRST_WORD_ID = 5        # ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK] in the rows' vocabulary
MASK_ID = 4
VOCAB = 30528            # the model's padded vocabulary (the rows' tokenizer has 30,522)


def mask_rows(rows: np.ndarray, prob: float, seed: int, vocab_words: int = 30522,
              slots: int = MASK_SLOTS):
    """Bernoulli(prob) over word tokens, at most `slots` a row, 80% [MASK] / 10% random / 10%
    kept. Returns (input ids, positions, weights, labels) and dense labels (-100 elsewhere)."""
    rng = np.random.default_rng(seed)
    ids = rows.astype(np.int32)
    chosen = (rng.random(ids.shape) < prob) & (ids >= FIRST_WORD_ID)
    for r in range(len(ids)):  # keep the first `slots` of each row
        chosen[r, np.flatnonzero(chosen[r])[slots:]] = False
    draw = rng.random(ids.shape)
    random_ids = rng.integers(FIRST_WORD_ID, vocab_words, ids.shape)
    dense_labels = np.where(chosen, ids, -100)
    masked = np.where(chosen & (draw < 0.8), MASK_ID,
                      np.where(chosen & (draw < 0.9), random_ids, ids)).astype(np.int32)
    return (masked,) + sparse_targets(dense_labels, slots) + (dense_labels,)


def sparse_targets(dense_labels: np.ndarray, slots: int):
    """Dense labels (-100 where not scored) -> (positions, weights, labels), `slots` a row."""
    n = len(dense_labels)
    positions = np.zeros((n, slots), np.int32)
    weights = np.zeros((n, slots), np.float32)
    labels = np.zeros((n, slots), np.int32)
    for r in range(n):
        where = np.flatnonzero(dense_labels[r] >= 0)
        if len(where) > slots:
            raise ValueError(f"{len(where)} masked tokens in a row exceed {slots} slots")
        positions[r, :len(where)], weights[r, :len(where)] = where, 1.0
        labels[r, :len(where)] = dense_labels[r, where]
    return positions, weights, labels


def grouped_targets(dense_labels: np.ndarray, groups: int, slots: int):
    """Dense labels [batch, seq] -> (positions, weights, labels) [groups, slots]: the masked
    tokens of each group of batch / groups rows share its slots, position = row in group *
    seq + token (the model's grouped masked_positions). Rows' counts vary (30% Bernoulli
    masking: 38 +- 5 at 128 tokens), their sum over many rows much less, so one group per
    batch needs about 40 slots a row where per-row slots need 64 (group_slots)."""
    batch, seq = dense_labels.shape
    rows = batch // groups
    positions = np.zeros((groups, slots), np.int32)
    weights = np.zeros((groups, slots), np.float32)
    labels = np.zeros((groups, slots), np.int32)
    for g in range(groups):
        flat = dense_labels[g * rows:(g + 1) * rows].reshape(-1)
        where = np.flatnonzero(flat >= 0)
        if len(where) > slots:
            raise ValueError(f"{len(where)} masked tokens in a group of {rows} rows exceed its "
                             f"{slots} slots; raise --jax-group-slots")
        positions[g, :len(where)], weights[g, :len(where)] = where, 1.0
        labels[g, :len(where)] = flat[where]
    return positions, weights, labels


def group_slots(rows: int, seq_len: int, prob: float = 0.3,
                slots_a_row: int = MASK_SLOTS) -> int:
    """Slots for the masked tokens of `rows` rows: their count's mean + 6 standard deviations
    (Bernoulli(prob) over the seq_len - 2 tokens after [CLS] and before [SEP]), rounded up to
    a multiple of 128, and never more than the rows' own slots_a_row each (mask_rows keeps no
    more). 256 rows of 128 tokens: 10,240 slots where per-row slots take 16,384."""
    n = (seq_len - 2) * rows
    bound = prob * n + 6 * math.sqrt(n * prob * (1 - prob))
    return min(rows * slots_a_row, math.ceil(bound / 128) * 128)


class Rows:
    """Train batches (a fresh permutation each epoch) and fixed eval batches, as numpy."""

    train_slots = MASK_SLOTS  # mask slots a row (subclasses with longer rows raise them)

    def __init__(self, path: str, batch: int, eval_rows: int):
        everything = np.load(path)
        self.eval_rows, self.train_rows = everything[:eval_rows], everything[eval_rows:]
        self.batch = batch
        self.seq_len = self.train_rows.shape[1]
        self.eval_batches = [mask_rows(self.eval_rows[i:i + batch], 0.15, 10_000 + i)
                             for i in range(0, eval_rows, batch)]

    def train_batch(self, step: int):
        per_epoch = len(self.train_rows) // self.batch
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng(1000 + epoch).permutation(len(self.train_rows))
        take = order[index * self.batch:(index + 1) * self.batch]
        return mask_rows(self.train_rows[take], 0.3, step, slots=self.train_slots)


def lr_at(step: int, lr: float, steps: int) -> float:
    warmup = int(round(0.06 * steps))
    if step < warmup:
        return lr * step / warmup
    return lr * (1 - 0.98 * (step - warmup) / max(steps - warmup, 1))


def run_jax(args, rows: Rows) -> dict:
    from mosaicbert_jax.xla_flags import apply_gpu_defaults
    apply_gpu_defaults()
    import jax
    from mosaicbert_jax import MosaicBertConfig, MosaicBertForMaskedLM
    from mosaicbert_jax.optim import decoupled_adamw, warmup_linear_decay
    from mosaicbert_jax.sharding import batch_sharding, make_mesh
    from mosaicbert_jax.training.step import init_state, make_eval_step, make_train_step

    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    overrides = parse_model_overrides(args.jax_model)
    if args.side == "jax-fp8":  # ours with FP8 GEMMs (model.fp8), beside the bf16 "jax" side
        overrides["fp8"] = True
    cfg = MosaicBertConfig.from_preset(overrides.pop("preset", "base"), dtype="bfloat16",
                                       vocab_size=VOCAB, **overrides)
    model = MosaicBertForMaskedLM(cfg)
    schedule = warmup_linear_decay(args.lr, args.steps, 0.06, 0.02)
    tx = decoupled_adamw(schedule, args.lr, 0.9, 0.98, 1e-6, 1e-5)
    state, shardings = init_state(model, tx, 17, mesh)
    step_fn = make_train_step(model, tx, schedule, mesh, shardings, 1, dropout_seed=17)
    eval_fn = make_eval_step(model, mesh, shardings["params"], shardings.get("fp8"))
    sharding = batch_sharding(mesh)
    segments = np.ones((args.batch, rows.seq_len), np.int32)

    def to_device(masked, positions, weights, labels, _dense):
        return jax.device_put({"input_ids": masked, "segment_ids": segments[:len(masked)],
                               "masked_positions": positions, "masked_weights": weights,
                               "masked_labels": labels}, sharding)

    groups = getattr(args, "jax_slot_groups", 0)  # long_context.py's runs keep per-row slots

    def to_device_grouped(masked, positions, weights, labels, dense):
        """A train batch with `groups` groups of masked slots (0: the per-row slots)."""
        if not groups:
            return to_device(masked, positions, weights, labels, dense)
        slots = getattr(args, "jax_group_slots", 0) or group_slots(len(masked) // groups,
                                                                   masked.shape[1])
        return to_device(masked, *grouped_targets(dense, groups, slots), dense)

    evals = [to_device(*b) for b in rows.eval_batches]

    def evaluate(params, fp8_stats=None):
        sums = [jax.device_get(eval_fn(params, b, fp8_stats)) for b in evals]
        weight = sum(float(s["weight_sum"]) for s in sums)
        return (sum(float(s["loss_sum"]) for s in sums) / weight,
                sum(float(s["correct_sum"]) for s in sums) / weight)

    t = time.perf_counter()
    compiled = step_fn.lower(state, to_device_grouped(*rows.train_batch(0))).compile()
    compile_s = time.perf_counter() - t
    result, state = _train_loop(args, rows, lambda b: to_device_grouped(*b),
                                lambda s, b: compiled(s, b)[0], state,
                                lambda s: evaluate(s["params"], s.get("fp8")),
                                jax.block_until_ready, compile_s,
                                {"config": overrides, "slot_groups": groups})
    if getattr(args, "save_params", ""):
        from mosaicbert_jax.checkpoint import save_pretrained
        save_pretrained(args.save_params, jax.device_get(state["params"]), cfg)
        result["saved_params"] = os.path.abspath(args.save_params)
    return result


def parse_model_overrides(text) -> dict:
    """--jax-model 'glu_implementation=xla,attention_window=64' (or a dict) -> config overrides,
    numbers as numbers and true/false as bools."""
    if isinstance(text, dict):
        return dict(text)
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise SystemExit(f"error: --jax-model item {item!r} is not key=value")
        key, value = item.split("=", 1)
        if value.lower() in ("true", "false"):
            overrides[key] = value.lower() == "true"
            continue
        try:
            overrides[key] = int(value)
        except ValueError:
            try:
                overrides[key] = float(value)
            except ValueError:
                overrides[key] = value
    return overrides


def _train_loop(args, rows, prepare, step, state, evaluate, sync, compile_s, extra):
    """Steps with the next batch prepared while the device works; evals off the clock. The
    device is synced only before each eval (and at the end): train_s sums the spans from the
    sync after one eval to the sync before the next, so queued steps overlap as in training.
    Returns (result, final state)."""
    log, train_s = [], 0.0
    upcoming = prepare(rows.train_batch(0))
    sync(upcoming)
    start = None
    for i in range(args.steps + 1):
        if i % args.eval_every == 0 or i == args.steps:
            sync(state)
            if start is not None:
                train_s += time.perf_counter() - start
            loss, accuracy = evaluate(state)
            log.append({"step": i, "train_s": train_s, "loss": loss, "accuracy": accuracy})
            print(f"{args.side} step {i} train_s {train_s:.1f} eval loss {loss:.4f}", flush=True)
            if i == args.steps:
                break
            sync(state)
            start = time.perf_counter()
        state = step(state, upcoming)
        upcoming = prepare(rows.train_batch(i + 1)) if i + 1 < args.steps else None
    tokens = args.steps * args.batch * rows.seq_len
    return {"side": args.side, "evals": log, "train_s": train_s, "compile_s": compile_s,
            "tokens_per_s": tokens / train_s if train_s > 0 else 0.0, **extra}, state


def run_torch(args, rows: Rows) -> dict:
    import torch
    import torch.nn.functional as F
    torch.set_float32_matmul_precision("high")
    torch.manual_seed(17)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to smoke-test this script
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if args.side == "original":
        sys.path.insert(0, os.path.abspath(args.reference_src))
        import bert_layers
        import configuration_bert
        bert_layers.flash_attn_qkvpacked_func = None  # its Triton kernel no longer compiles
        padding = bert_layers.bert_padding_module

        def sdpa_attention(self, hidden, cu_seqlens, max_seqlen, indices, attn_mask, bias):
            qkv = padding.pad_input(self.Wqkv(hidden), indices, cu_seqlens.shape[0] - 1,
                                    max_seqlen)
            b, s, _ = qkv.shape
            qkv = qkv.view(b, s, 3, self.num_attention_heads, -1).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                                 attn_mask=bias.to(qkv.dtype))
            out = padding.unpad_input_only(out.permute(0, 2, 1, 3),
                                           torch.squeeze(attn_mask) == 1)
            return out.reshape(out.shape[0], -1)

        bert_layers.BertUnpadSelfAttention.forward = sdpa_attention
        model = bert_layers.BertForMaskedLM(configuration_bert.BertConfig(
            vocab_size=VOCAB, alibi_starting_size=512, attention_probs_dropout_prob=0.0))
        model = model.to(dev).train()
        compile_s = 0.0
    else:
        from transformers import BertConfig, BertForMaskedLM
        model = torch.compile(BertForMaskedLM(BertConfig(vocab_size=VOCAB,
                                                         attn_implementation="sdpa")).to(dev))
        compile_s = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
                            weight_decay=1e-5 / args.lr, fused=dev == "cuda")  # decoupled, as ours
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.lr, args.steps) / args.lr)
    ones = torch.ones(args.batch, 128, dtype=torch.long, device=dev)

    def prepare(b):
        masked, _, _, _, dense = b
        return (torch.from_numpy(masked).long().to(dev, non_blocking=True),
                torch.from_numpy(dense).long().to(dev, non_blocking=True))

    def step(state, batch):
        ids, labels = batch
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=ones[:len(ids)], labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return state

    def evaluate(_state):
        model.eval()
        total = count = correct = 0.0
        with torch.no_grad():
            for b in rows.eval_batches:
                ids, labels = prepare(b)
                with torch.autocast(dev, dtype=torch.bfloat16):
                    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
                picked = labels > 0
                n = float(picked.sum())
                total, count = total + float(out.loss) * n, count + n
                correct += float((out.logits.float()[picked].argmax(-1) == labels[picked]).sum())
        model.train()
        return total / count, correct / count

    if args.side == "hfbert":  # compile outside the clock, on a batch the run never trains on
        start = time.perf_counter()
        ids, labels = prepare(rows.train_batch(10 ** 6))
        for _ in range(3):
            with torch.autocast(dev, dtype=torch.bfloat16):
                model(input_ids=ids, attention_mask=ones, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        compile_s = time.perf_counter() - start
    return _train_loop(args, rows, prepare, step, None, evaluate,
                       lambda _: sync(), compile_s, {})[0]


def seconds_to_reach(evals: list[dict], target: float) -> float | None:
    """Train seconds at which the eval loss first reaches target (linear between evals)."""
    for before, after in zip(evals, evals[1:]):
        if after["loss"] <= target:
            span = before["loss"] - after["loss"]
            share = (before["loss"] - target) / span if span > 0 else 1.0
            return before["train_s"] + share * (after["train_s"] - before["train_s"])
    return None


def report(results: list[dict]) -> None:
    steps = sorted({e["step"] for r in results for e in r["evals"]})
    print("\n| step | " + " | ".join(r["side"] for r in results) + " |")
    print("| --- |" + " --- |" * len(results))
    for s in steps:
        cells = []
        for r in results:
            e = next((e for e in r["evals"] if e["step"] == s), None)
            cells.append(f"{e['loss']:.4f} ({e['train_s']:.1f} s)" if e else "-")
        print(f"| {s} | " + " | ".join(cells) + " |")
    original = next((r for r in results if r["side"] == "original"), None)
    print("\n| side | lr | train s | tokens/s | compile s | final eval loss | train s to the "
          "original's final loss | vs original |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    target = original["evals"][-1]["loss"] if original else None
    base = seconds_to_reach(original["evals"], target) if original else None
    for r in results:
        reach = seconds_to_reach(r["evals"], target) if target is not None else None
        reach_text = f"{reach:.1f}" if reach is not None else "not reached"
        ratio = f"{reach / base:.2f}x" if reach is not None and base else "-"
        print(f"| {r['side']} | {r['lr']:g} | {r['train_s']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['compile_s']:.1f} | {r['evals'][-1]['loss']:.4f} | {reach_text} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="../shared/data/ttq/rows.npy")
    parser.add_argument("--reference-src", default="../shared/reference/mosaicml_bert")
    parser.add_argument("--sides", default="jax,original,hfbert")
    parser.add_argument("--side", default="", help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4, help="ours and the original")
    parser.add_argument("--hfbert-lr", type=float, default=1e-4,
                        help="transformers BERT diverges at 2e-4 and 3e-4 on these rows")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-rows", type=int, default=2048)
    parser.add_argument("--jax-model", default="",
                        help="MosaicBertConfig overrides for our side, e.g. glu_implementation=xla")
    parser.add_argument("--jax-slot-groups", type=int, default=1,
                        help="our side's train batches share masked slots within this many "
                             "groups of rows (1: the whole batch; 0: 64 slots per row; on "
                             "several devices, a multiple of the batch-sharding devices)")
    parser.add_argument("--jax-group-slots", type=int, default=0,
                        help="slots per group (default: group_slots, 10,240 for 256 rows)")
    add_tile_flags(parser)   # kernel tiles for our side
    parser.add_argument("--out", default="", help="write all results as JSON here")
    parser.add_argument("--save-params", default="",
                        help="save our side's final params here (save_pretrained folder; "
                             "long_context.py extrapolation --params reads it)")
    args = parser.parse_args()
    if not os.path.isfile(args.rows):
        sys.exit(f"error: rows file {args.rows} not found; pass --rows (see ../shared/data/ttq)")
    if (args.save_params and not args.side
            and os.path.exists(os.path.join(args.save_params, "params"))):
        sys.exit(f"error: --save-params {args.save_params} already holds params; pass a new folder")
    if args.jax_slot_groups < 0 or (args.jax_slot_groups and args.batch % args.jax_slot_groups):
        sys.exit(f"error: --jax-slot-groups {args.jax_slot_groups} must divide --batch "
                 f"{args.batch} (or be 0 for per-row slots)")
    if args.side:  # child process: one side, result as the last line
        apply_tile_flags(parser, args)
        rows = Rows(args.rows, args.batch, args.eval_rows)
        result = (run_jax(args, rows) if args.side in ("jax", "jax-fp8")
                  else run_torch(args, rows))
        result["lr"] = args.lr
        print("TTQ_RESULT " + json.dumps(result), flush=True)
        return
    results = []
    sides = args.sides.split(",")
    # Only the first of our sides saves its params (the others would find the folder taken).
    saving_side = next((s for s in sides if s in ("jax", "jax-fp8")), None)
    for side in sides:
        lr = args.hfbert_lr if side == "hfbert" else args.lr
        command = [sys.executable, os.path.abspath(__file__), "--side", side, "--lr", str(lr)]
        for name in ("rows", "reference_src", "steps", "batch", "eval_every", "eval_rows",
                     "jax_model", "jax_slot_groups", "jax_group_slots", "fused_blocks",
                     "attention_blocks", "mlm_loss_blocks"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        if side == saving_side and args.save_params:
            command += ["--save-params", args.save_params]
        proc = subprocess.run(command, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("TTQ_RESULT ")]
        if proc.returncode or not lines:
            print(f"{side}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(lines[-1][len("TTQ_RESULT "):]))
        print(f"{side}: {results[-1]['train_s']:.1f} s, final eval loss "
              f"{results[-1]['evals'][-1]['loss']:.4f}", flush=True)
    report(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
