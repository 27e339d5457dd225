"""One-off generator of tests/assets/golden_original/: logits of the ORIGINAL PyTorch MosaicBERT.

Not run by the tests (they read only the files it writes). It imports the original
(mosaicml/examples bert_layers.py & co.) by path, builds a tiny model with every parameter
randomised, runs a padded batch through its BertForMaskedLM and BertForSequenceClassification
(eval mode, fp32, PyTorch attention) and stores the state dicts, inputs and logits.

    python tests/assets/make_golden.py --reference-src ../shared/reference/mosaicml_bert

Needs torch, einops and transformers (the original's imports); the project needs none of them.
Rerunning it with the same seed rewrites the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_original")
SEED = 20261201
# 2 layers, 6 heads (not a power of two: the ALiBi slopes interleave 4 + 2), small sizes.
SIZES = dict(vocab_size=96, hidden_size=48, num_attention_heads=6, num_hidden_layers=2,
             intermediate_size=40, type_vocab_size=2, num_labels=3)
SEQ_LEN = 20
ROW_LENGTHS = (20, 15, 11, 6, 1)  # one full row, three padded ones, a single token


def import_original(reference_src: str):
    """bert_layers and configuration_bert from the reference folder, on PyTorch attention."""
    if not os.path.isfile(os.path.join(reference_src, "bert_layers.py")):
        raise SystemExit(f"--reference-src {reference_src!r} has no bert_layers.py; give the "
                         f"folder holding the original's bert_layers.py")
    sys.path.insert(0, os.path.abspath(reference_src))
    import bert_layers
    import configuration_bert

    bert_layers.flash_attn_qkvpacked_func = None  # its Triton kernel no longer compiles
    return bert_layers, configuration_bert


def random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Every parameter random and non-trivial: LayerNorm scales in [0.5, 1.5], all biases and
    LayerNorm shifts non-zero, linear weights ~N(0, 1/fan_in) so activations stay O(1)."""
    if name.endswith(("LayerNorm.weight", "layernorm.weight")):
        value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("word_embeddings.weight"):
        value = rng.normal(0.0, 0.3, shape)  # also the tied decoder: logits of order 1
    elif name.endswith("token_type_embeddings.weight"):
        value = rng.normal(0.0, 0.5, shape)
    elif name.endswith("decoder.bias"):
        value = rng.normal(0.0, 0.5, shape)
    elif name.endswith(".bias"):
        value = rng.normal(0.0, 0.2, shape)
    else:
        value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
    return value.astype(np.float32)


def randomise(model, rng: np.random.Generator, skip: tuple[str, ...] = ()) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():  # the tied decoder weight comes once
            if not name.startswith(skip):
                param.copy_(torch.from_numpy(random_value(name, tuple(param.shape), rng)))


def padded_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of different lengths padded with id 0; token types 0 then 1 (a sentence pair)."""
    batch = len(ROW_LENGTHS)
    ids = np.zeros((batch, SEQ_LEN), np.int64)
    mask = np.zeros((batch, SEQ_LEN), np.int64)
    types = np.zeros((batch, SEQ_LEN), np.int64)
    for row, length in enumerate(ROW_LENGTHS):
        ids[row, :length] = rng.integers(1, SIZES["vocab_size"], length)
        mask[row, :length] = 1
        if length > 1:
            types[row, int(rng.integers(1, length)):length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def hf_config_json(config, architecture: str) -> dict:
    """The config.json the original's BertConfig writes, with the release's architectures and
    auto_map."""
    auto_class = ("AutoModelForMaskedLM" if architecture == "BertForMaskedLM"
                  else "AutoModelForSequenceClassification")
    config.architectures = [architecture]
    config.auto_map = {"AutoConfig": "configuration_bert.BertConfig",
                       auto_class: f"bert_layers.{architecture}"}
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-src", required=True,
                        help="folder with the original's bert_layers.py (e.g. "
                             "../shared/reference/mosaicml_bert)")
    parser.add_argument("--out", default=OUT_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    bert_layers, configuration_bert = import_original(args.reference_src)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    config = configuration_bert.BertConfig(**SIZES)  # layer_norm_eps 1e-12 as released

    mlm = bert_layers.BertForMaskedLM(config).eval()
    randomise(mlm, rng)
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    classifier = bert_layers.BertForSequenceClassification(config).eval()
    classifier.bert.load_state_dict(mlm.bert.state_dict(), strict=False)  # the same encoder
    randomise(classifier, rng, skip=("bert.embeddings.", "bert.encoder."))

    inputs = padded_batch(rng)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        mlm_logits = mlm(**tensors).logits.numpy()
        cls_logits = classifier(**tensors).logits.numpy()

    mlm_state = {k: v.numpy() for k, v in mlm.state_dict().items()}
    cls_state = {k: v.numpy() for k, v in classifier.state_dict().items()}
    for name in set(mlm_state) & set(cls_state):
        assert np.array_equal(mlm_state[name], cls_state[name]), name
    arrays = {f"state.{k}": v for k, v in {**mlm_state, **cls_state}.items()}
    arrays.update({f"input.{k}": v.astype(np.int32) for k, v in inputs.items()})
    arrays["logits.mlm"] = mlm_logits.astype(np.float32)
    arrays["logits.classification"] = cls_logits.astype(np.float32)

    os.makedirs(args.out, exist_ok=True)
    np.savez_compressed(os.path.join(args.out, "golden.npz"), **arrays)
    meta = {
        "about": "Golden figures of the original PyTorch MosaicBERT (mosaicml/examples "
                 "bert_layers.py), written by tests/assets/make_golden.py; read by "
                 "tests/test_golden.py.",
        "seed": SEED, "sizes": SIZES, "row_lengths": list(ROW_LENGTHS),
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "state_dict_keys": {"mlm": list(mlm_state), "classification": list(cls_state)},
        "hf_config": {"mlm": hf_config_json(config, "BertForMaskedLM"),
                      "classification": hf_config_json(config, "BertForSequenceClassification")},
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: MLM logits {mlm_logits.shape}, classification {cls_logits.shape}")


if __name__ == "__main__":
    main()
