"""Fill-mask: the top-k tokens an MLM checkpoint predicts at each [MASK] of a text.

  python -m mosaicbert_jax.fill_mask --checkpoint DIR "The [MASK] statement exits a loop."

DIR is anything `mosaicbert_jax.checkpoint.load_pretrained` reads: a training workdir (its
latest step), one `checkpoints/<step>` folder, a `save_pretrained` folder or a PyTorch folder.
The tokenizer is --tokenizer (a tokenizer.json, a vocab.txt or a directory holding one, such as
a prepared shards directory), else the tokenizer.json / vocab.txt saved with the checkpoint.
In Python: `fill_mask(params, config, tokenizer, text, top_k)`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mosaicbert_jax.cli_errors import exit_status
from mosaicbert_jax.checkpoint import (checkpoint_root, find_tokenizer_files, load_pretrained,
                                       trained_seq_len)
from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.model import MosaicBertForMaskedLM
from mosaicbert_jax.param_layout import infer_model_kind

MASK_TOKEN = "[MASK]"
_LENGTH_MULTIPLE = 16  # texts are padded to a multiple of this so similar lengths share a compile
_TOKENIZER_NAMES = ("tokenizer.json", "vocab.txt")
# Inputs longer than this many times the training length get a warning: ALiBi extrapolates,
# but not without limit. With the training length unknown, past UNKNOWN_LENGTH_LIMIT tokens
# (the released models' max_position_embeddings).
FAR_PAST_FACTOR = 2
UNKNOWN_LENGTH_LIMIT = 512


def length_warning(num_tokens: int, trained_len: Optional[int]) -> Optional[str]:
    """A one-line warning for an input far past the length the model was trained at."""
    if trained_len:
        if num_tokens <= FAR_PAST_FACTOR * trained_len:
            return None
        trained = f"the {trained_len} tokens the model was trained on"
    else:
        if num_tokens <= UNKNOWN_LENGTH_LIMIT:
            return None
        trained = f"{UNKNOWN_LENGTH_LIMIT} tokens (the model's training length is unknown)"
    return (f"warning: the text has {num_tokens} tokens, far past {trained}; ALiBi "
            f"extrapolates to longer inputs, but not without limit: expect worse predictions, "
            f"or split the text")


def encode_masked(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids of `[CLS] text [SEP]` and the positions of its [MASK] tokens (at least one)."""
    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    if mask_id is None:
        raise ValueError(f"the tokenizer has no {MASK_TOKEN} token; use the MLM's own tokenizer")
    ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    positions = np.flatnonzero(ids == mask_id).astype(np.int32)
    if positions.size == 0:
        hint = (f" (write it in capitals: {MASK_TOKEN})" if MASK_TOKEN.lower() in text.lower()
                else "")
        raise ValueError(f"no {MASK_TOKEN} token in the text {text!r}{hint}; put {MASK_TOKEN} "
                         f"where a word should be predicted, e.g. 'Paris is the [MASK] of France.'")
    return ids, positions


@functools.lru_cache(maxsize=8)
def _log_probs_fn(config: MosaicBertConfig, vocab_limit: int, top_k: int):
    """Jitted (params, ids, segments, positions) -> top-k (log-probs, ids) at the positions."""
    model = MosaicBertForMaskedLM(config)

    @jax.jit
    def top_predictions(params, input_ids, segment_ids, masked_positions):
        logits = model.apply({"params": params}, input_ids, segment_ids,
                             masked_positions=masked_positions, deterministic=True)
        # Only ids the tokenizer can produce: the padding of the vocabulary is no token.
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), top_k)

    return top_predictions


def _check_tokenizer_fits(tokenizer: Any, config: MosaicBertConfig) -> int:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise ValueError(f"the tokenizer has {size} ids but the model's vocab_size is "
                         f"{config.vocab_size}: this tokenizer does not belong to this model; "
                         f"pass the tokenizer it was trained with (--tokenizer)")
    return size


def predict_masks(params: Any, config: MosaicBertConfig, tokenizer: Any, text: str,
                  top_k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, [MASK] positions, top-k probabilities [masks, k], top-k ids [masks, k])."""
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    vocab_limit = _check_tokenizer_fits(tokenizer, config)
    if top_k > vocab_limit:
        raise ValueError(f"top_k={top_k} is larger than the vocabulary ({vocab_limit} tokens)")
    if infer_model_kind(params) != "mlm":
        raise ValueError("this checkpoint is a classification model (no MLM head 'cls'); "
                         "fill-mask needs a pretrained MLM checkpoint")
    ids, positions = encode_masked(tokenizer, text)
    length = -(-len(ids) // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE
    input_ids = np.zeros((1, length), np.int32)
    input_ids[0, :len(ids)] = ids
    segment_ids = (np.arange(length) < len(ids)).astype(np.int32)[None]
    fn = _log_probs_fn(config, vocab_limit, top_k)
    log_probs, top_ids = jax.device_get(fn(params, input_ids, segment_ids, positions[None]))
    return ids, positions, np.exp(log_probs[0]), top_ids[0]


def fill_mask(params: Any, config: MosaicBertConfig, tokenizer: Any, text: str,
              top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] of `text`, in order: its `top_k` (token, probability), most likely first.

    Probabilities are the MLM's softmax over the tokenizer's vocabulary at that position.
    """
    _, _, probs, top_ids = predict_masks(params, config, tokenizer, text, top_k)
    return [[(tokenizer.id_to_token(int(i)), float(p)) for i, p in zip(row_ids, row_probs)]
            for row_ids, row_probs in zip(top_ids, probs)]


def fill_text(tokenizer: Any, ids: np.ndarray, positions: np.ndarray,
              fill_ids: Sequence[int]) -> str:
    """The text with each [MASK] replaced by the given token id, decoded back to words."""
    filled = np.array(ids)
    filled[positions] = np.asarray(fill_ids, filled.dtype)
    return tokenizer.decode(filled.tolist(), skip_special_tokens=True)


def find_tokenizer(checkpoint: str) -> str:
    """The tokenizer.json / vocab.txt saved with a checkpoint (or its training workdir)."""
    root = checkpoint_root(checkpoint)
    found = [f for f in find_tokenizer_files(root) if f.name in _TOKENIZER_NAMES]
    if found:
        return os.fspath(found[0])
    raise ValueError(
        f"no tokenizer found with the checkpoint: {root} holds neither "
        f"{' nor '.join(_TOKENIZER_NAMES)}. Pass --tokenizer PATH: a tokenizer.json, a vocab.txt, "
        f"or the prepared shards directory the model was trained on (it holds tokenizer.json)"
        f"{_embedded_hint()}")


def _embedded_hint() -> str:
    """Where the embedded corpus's tokenizers are, for models trained with configs/tiny.py."""
    from mosaicbert_jax.training.defaults import get_default_config
    cache = os.path.join(os.path.expanduser(get_default_config().data.cache_dir), "embedded")
    if not os.path.isdir(cache):
        return ""
    candidates = sorted(os.path.join(cache, name) for name in os.listdir(cache)
                        if os.path.isfile(os.path.join(cache, name, "tokenizer.json")))
    if not candidates:
        return ""
    return (". A model trained on the embedded corpus (configs/tiny.py) uses the tokenizer in "
            "its shards directory, e.g. --tokenizer " + candidates[-1])


def _format(text: str, ids: np.ndarray, positions: np.ndarray, probs: np.ndarray,
            top_ids: np.ndarray, tokenizer: Any) -> str:
    lines = [text]
    for n, (position, row_probs, row_ids) in enumerate(zip(positions, probs, top_ids), 1):
        lines.append(f"  [MASK] {n} of {len(positions)} (token {int(position)}):")
        for rank, (i, p) in enumerate(zip(row_ids, row_probs), 1):
            lines.append(f"    {rank:2d}. {tokenizer.id_to_token(int(i)):<20s} {p:.4f}")
    lines.append("  top-1 filled: " + fill_text(tokenizer, ids, positions, top_ids[:, 0]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mosaicbert_jax.fill_mask",
        description="Print the top-k predictions of a MosaicBERT MLM at each [MASK] of a text.")
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir (latest step), checkpoints/<step> folder, "
                             "save_pretrained folder or PyTorch folder")
    parser.add_argument("--tokenizer", help="tokenizer.json, vocab.txt, or a directory holding "
                                            "one (default: the one saved with the checkpoint)")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per [MASK] (default 5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (default float32, whatever the model trained in)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per text instead of the table")
    parser.add_argument("text", nargs="+", help=f"text(s) with at least one {MASK_TOKEN}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 on success; a user's mistake prints one `error:` line and gives 2 (see cli_errors)."""
    args = build_parser().parse_args(argv)
    return exit_status(_run, args)


def _run(args: argparse.Namespace) -> None:
    """Loads the tokenizer and the checkpoint, prints the predictions for every text."""
    from mosaicbert_jax.data.tokenizer import load_tokenizer

    tokenizer_path = args.tokenizer or find_tokenizer(args.checkpoint)
    tokenizer = load_tokenizer(tokenizer_path)
    for text in args.text:  # fail on a text without [MASK] before loading any weights
        encode_masked(tokenizer, text)
    params, config = load_pretrained(args.checkpoint)
    config = config.replace(dtype=args.dtype)
    trained_len = trained_seq_len(args.checkpoint)
    for text in args.text:
        ids, positions, probs, top_ids = predict_masks(params, config, tokenizer, text,
                                                       args.top_k)
        warning = length_warning(len(ids), trained_len)
        if warning:
            print(warning, file=sys.stderr)
        if args.json:
            print(json.dumps({
                "text": text,
                "filled": fill_text(tokenizer, ids, positions, top_ids[:, 0]),
                "masks": [{"position": int(pos), "predictions": [
                    {"token": tokenizer.id_to_token(int(i)), "probability": float(p)}
                    for i, p in zip(row_ids, row_probs)]}
                    for pos, row_probs, row_ids in zip(positions, probs, top_ids)]}))
        else:
            print(_format(text, ids, positions, probs, top_ids, tokenizer))


if __name__ == "__main__":
    sys.exit(main())
