"""Against the ORIGINAL PyTorch MosaicBERT: its state dict and logits, stored once by
tests/assets/make_golden.py (the original's code is not needed here).

The figures: a 2-layer, 6-head (not a power of two) model with every parameter random, a padded
batch of rows of 20, 15, 11, 6 and 1 tokens with token types 0 and 1, and the original's MLM and
sequence-classification logits (eval, fp32). The original zeroes the hidden states of padding
before its MLM head, so its logits there are the head of a zero vector, not a prediction; our
model makes no promise at padding, so MLM logits are compared at real tokens only.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mosaicbert_jax import MosaicBertForMaskedLM, MosaicBertForSequenceClassification
from mosaicbert_jax.checkpoint import load_pretrained
from mosaicbert_jax.convert import config_from_hf_json, main, torch_state_dict_to_flax

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "golden_original")
KINDS = ("mlm", "classification")
MODELS = {"mlm": MosaicBertForMaskedLM, "classification": MosaicBertForSequenceClassification}
TOLERANCE = 1e-4  # fp32 max abs difference; the logits are of order 1 (checked below)


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(ASSETS, "config.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(ASSETS, "golden.npz")) as z:
        arrays = {name: z[name] for name in z.files}
    state = {name[len("state."):]: v for name, v in arrays.items() if name.startswith("state.")}
    return {
        "meta": meta,
        "state_dict": {kind: {name: state[name] for name in meta["state_dict_keys"][kind]}
                       for kind in KINDS},
        "inputs": {name[len("input."):]: v for name, v in arrays.items()
                   if name.startswith("input.")},
        "logits": {kind: arrays[f"logits.{kind}"] for kind in KINDS},
    }


def original_folder(path, golden, kind, weights_file):
    """A folder as the original's users have it: its config.json and its state dict, in
    pytorch_model.bin (torch.save, decoder weight sharing the embedding's storage) or
    model.safetensors."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(golden["meta"]["hf_config"][kind], indent=2))
    state_dict = golden["state_dict"][kind]
    if weights_file == "pytorch_model.bin":
        torch = pytest.importorskip("torch")
        tensors = {name: torch.from_numpy(value.copy()) for name, value in state_dict.items()}
        if kind == "mlm":
            tensors["cls.predictions.decoder.weight"] = \
                tensors["bert.embeddings.word_embeddings.weight"]
        torch.save(tensors, path / weights_file)
    else:
        from safetensors.numpy import save_file
        save_file(dict(state_dict), str(path / weights_file))
    return path


def flax_logits(params, config, kind, inputs, **kwargs):
    model = MODELS[kind](config)
    return np.asarray(model.apply({"params": params}, jnp.asarray(inputs["input_ids"]),
                                  jnp.asarray(inputs["attention_mask"]),
                                  jnp.asarray(inputs["token_type_ids"]), **kwargs))


def assert_matches_golden(got, golden, kind):
    want = golden["logits"][kind]
    assert got.shape == want.shape
    if kind == "mlm":
        real = golden["inputs"]["attention_mask"] == 1
        got, want = got[real], want[real]
    assert want.std() > 0.1  # logits that vary, so the tolerance below means something
    diff = float(np.abs(got - want).max())
    assert diff < TOLERANCE, f"{kind}: max |ours - original| = {diff:.2e}"


def test_golden_figures_are_what_the_tests_assume(golden):
    inputs, meta = golden["inputs"], golden["meta"]
    mask = inputs["attention_mask"]
    assert mask.sum(1).tolist() == meta["row_lengths"] == [20, 15, 11, 6, 1]
    assert set(np.unique(inputs["token_type_ids"][mask == 1])) == {0, 1}
    assert meta["sizes"]["num_attention_heads"] == 6 and meta["sizes"]["num_hidden_layers"] == 2
    state = golden["state_dict"]["mlm"]
    for name, value in state.items():  # every parameter randomised, not left at its init
        if name.endswith(("LayerNorm.weight", "layernorm.weight")):
            assert value.std() > 0.1, name
        else:
            assert value.std() > 0.05, name  # init leaves 0, 1 or N(0, 0.02)
    np.testing.assert_array_equal(state["cls.predictions.decoder.weight"],
                                  state["bert.embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("kind", KINDS)
def test_flax_model_with_converted_params_matches_the_original(golden, kind):
    config = config_from_hf_json(golden["meta"]["hf_config"][kind])
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.vocab_size, config.num_labels) == (48, 6, 40, 96, 3)
    params = torch_state_dict_to_flax(golden["state_dict"][kind], config)
    assert_matches_golden(flax_logits(params, config, kind, golden["inputs"]), golden, kind)


def test_sparse_mlm_head_matches_the_original_at_masked_positions(golden):
    config = config_from_hf_json(golden["meta"]["hf_config"]["mlm"])
    params = torch_state_dict_to_flax(golden["state_dict"]["mlm"], config)
    positions = np.array([[0, 7, 19], [3, 14, 9], [10, 0, 5], [5, 1, 2], [0, 0, 0]], np.int32)
    got = flax_logits(params, config, "mlm", golden["inputs"], masked_positions=positions)
    want = np.take_along_axis(golden["logits"]["mlm"], positions[:, :, None], axis=1)
    assert float(np.abs(got - want).max()) < TOLERANCE


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
@pytest.mark.parametrize("kind", KINDS)
def test_convert_from_torch_then_to_torch_against_the_original(tmp_path, golden, kind,
                                                               weights_file):
    src = original_folder(tmp_path / "original", golden, kind, weights_file)
    assert main(["from-torch", "--src", str(src), "--out", str(tmp_path / "jax")]) == 0
    params, config = load_pretrained(str(tmp_path / "jax"))
    assert_matches_golden(flax_logits(params, config, kind, golden["inputs"]), golden, kind)

    assert main(["to-torch", "--checkpoint", str(tmp_path / "jax"),
                 "--out", str(tmp_path / "back")]) == 0
    from safetensors.numpy import load_file
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    want = golden["state_dict"][kind]
    assert set(back) == set(want)
    for name, value in want.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    hf_config = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                "intermediate_size", "type_vocab_size", "layer_norm_eps", "pad_token_id",
                "hidden_act", "model_type", "alibi_starting_size"):
        assert hf_config[key] == golden["meta"]["hf_config"][kind][key], key
    assert len(hf_config["id2label"]) == 3
