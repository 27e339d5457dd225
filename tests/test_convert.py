"""JAX <-> PyTorch conversion: exact round trips, spec key set, logit parity, clear errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

from mosaicbert_jax import (MosaicBertConfig, MosaicBertForMaskedLM,  # noqa: E402
                            MosaicBertForSequenceClassification)
from mosaicbert_jax.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from mosaicbert_jax.convert import build_parser, export_torch_folder, main  # noqa: E402
from mosaicbert_jax.param_layout import (config_from_hf_json, config_to_hf_json,  # noqa: E402
                                         flax_to_torch_state_dict, torch_state_dict_to_flax)
from mosaicbert_jax.torch_model import (MosaicBertTorchForMaskedLM,  # noqa: E402
                                        MosaicBertTorchForSequenceClassification,
                                        load_torch_model)

TINY = MosaicBertConfig.tiny(vocab_size=320, num_attention_heads=12, hidden_size=96,
                             num_labels=3)
KINDS = {"mlm": MosaicBertForMaskedLM, "classification": MosaicBertForSequenceClassification}


def spec_base_shapes():
    """The spec's PyTorch names and shapes for MosaicBERT-base MLM, written out by hand."""
    shapes = {"bert.embeddings.word_embeddings.weight": (30528, 768),
              "bert.embeddings.token_type_embeddings.weight": (2, 768),
              "bert.embeddings.LayerNorm.weight": (768,), "bert.embeddings.LayerNorm.bias": (768,)}
    for i in range(12):
        p = f"bert.encoder.layer.{i}."
        shapes.update({
            p + "attention.self.Wqkv.weight": (2304, 768), p + "attention.self.Wqkv.bias": (2304,),
            p + "attention.output.dense.weight": (768, 768),
            p + "attention.output.dense.bias": (768,),
            p + "attention.output.LayerNorm.weight": (768,),
            p + "attention.output.LayerNorm.bias": (768,),
            p + "mlp.gated_layers.weight": (6144, 768),
            p + "mlp.wo.weight": (768, 3072), p + "mlp.wo.bias": (768,),
            p + "mlp.layernorm.weight": (768,), p + "mlp.layernorm.bias": (768,)})
    shapes.update({"cls.predictions.transform.dense.weight": (768, 768),
                   "cls.predictions.transform.dense.bias": (768,),
                   "cls.predictions.transform.LayerNorm.weight": (768,),
                   "cls.predictions.transform.LayerNorm.bias": (768,),
                   "cls.predictions.decoder.weight": (30528, 768),
                   "cls.predictions.decoder.bias": (30528,)})
    return shapes


def random_params(config, kind, seed, dtype=np.float32):
    """Random params with the model's tree: weights ~N(0, 0.02) as at init, LayerNorm scales
    ~1 + noise, biases non-zero, so a transposed or misplaced tensor changes the logits."""
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: KINDS[kind](config).init(jax.random.key(0), ids, ids))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        value = 0.02 * rng.standard_normal(s.shape, dtype=np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            value += 1.0
        return value.astype(dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes["params"])


def padded_batch(config, lengths, seq, seed=0):
    """Random ids with trailing padding (id 0), random token types; mask 1 = real token."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, (len(lengths), seq))
    mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    types = rng.integers(0, config.type_vocab_size, ids.shape) * mask
    return ids * mask, mask, types


def flax_logits(config, kind, params, ids, mask, types):
    model = KINDS[kind](config)
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                  jnp.asarray(types)))


def torch_logits(model, ids, mask, types):
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask),
                     torch.from_numpy(types)).numpy()


def assert_parity(config, kind, params, torch_model, lengths, seq):
    ids, mask, types = padded_batch(config, lengths, seq)
    expected = flax_logits(config, kind, params, ids, mask, types)
    got = torch_logits(torch_model, ids, mask, types)
    if kind == "mlm":  # the two pad differently; only real tokens are defined
        expected, got = expected[mask == 1], got[mask == 1]
    scale = np.abs(expected).max()
    assert scale > 0.01  # not trivially small
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(got - expected).max() < 1e-4 * scale  # and relatively close, too


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


@pytest.mark.parametrize("kind", ["mlm", "classification"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_round_trip_is_bit_exact(kind, dtype):
    params = random_params(TINY, kind, seed=0, dtype=dtype)
    state_dict = flax_to_torch_state_dict(params, TINY)
    assert all(isinstance(v, np.ndarray) for v in state_dict.values())
    assert_trees_equal(params, torch_state_dict_to_flax(state_dict, TINY))


def test_state_dict_layout_transposes_and_ties():
    params = random_params(TINY, "mlm", seed=0)
    state_dict = flax_to_torch_state_dict(params, TINY)
    layer = params["bert"]["encoder"]["layer_1"]
    np.testing.assert_array_equal(state_dict["bert.encoder.layer.1.attention.self.Wqkv.weight"],
                                  layer["attention_self"]["Wqkv"]["kernel"].T)
    np.testing.assert_array_equal(state_dict["bert.encoder.layer.1.mlp.layernorm.weight"],
                                  layer["mlp"]["layernorm"]["scale"])
    np.testing.assert_array_equal(state_dict["cls.predictions.decoder.weight"],
                                  state_dict["bert.embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("kind", ["mlm", "classification"])
def test_cli_round_trip_and_tiny_parity(tmp_path, kind):
    params = random_params(TINY, kind, seed=1)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[CLS]\n")
    save_pretrained(str(tmp_path / "jax"), params, TINY, tokenizer_file=str(vocab))
    assert main(["to-torch", "--checkpoint", str(tmp_path / "jax"),
                 "--out", str(tmp_path / "torch")]) == 0
    assert (tmp_path / "torch" / "vocab.txt").read_text() == vocab.read_text()
    assert main(["to-torch", "--checkpoint", str(tmp_path / "jax"),  # never overwrites
                 "--out", str(tmp_path / "torch")]) == 2
    hf_config = json.loads((tmp_path / "torch" / "config.json").read_text())
    assert hf_config["hidden_size"] == 96 and hf_config["num_attention_heads"] == 12

    torch_model = load_torch_model(tmp_path / "torch")
    expected_cls = (MosaicBertTorchForMaskedLM if kind == "mlm"
                    else MosaicBertTorchForSequenceClassification)
    assert type(torch_model) is expected_cls
    assert_parity(TINY, kind, params, torch_model, lengths=[24, 17, 5], seq=24)

    assert_trees_equal(params, load_pretrained(str(tmp_path / "torch"))[0])
    assert main(["from-torch", "--src", str(tmp_path / "torch"),
                 "--out", str(tmp_path / "back")]) == 0
    back, config = load_pretrained(str(tmp_path / "back"))
    assert config == TINY
    assert_trees_equal(params, back)
    assert (tmp_path / "back" / "vocab.txt").exists()


def test_to_torch_from_training_workdir(tmp_path):
    """to-torch reads a training workdir (CheckpointManager with state/model_config items) and
    picks up the tokenizer file lying in the workdir."""
    import optax
    import orbax.checkpoint as ocp

    from mosaicbert_jax.checkpoint import config_to_dict

    params = jax.tree_util.tree_map(jnp.asarray, random_params(TINY, "mlm", seed=4))
    manager = ocp.CheckpointManager(tmp_path / "checkpoints",
                                    item_names=("state", "data_state", "model_config"))
    manager.save(7, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt_state": optax.adamw(1e-3).init(params),
                                     "step": 7}),
        data_state=ocp.args.JsonSave({}), model_config=ocp.args.JsonSave(config_to_dict(TINY))))
    manager.wait_until_finished()
    manager.close()
    (tmp_path / "tokenizer.json").write_text("{}")
    assert main(["to-torch", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "pt")]) == 0
    assert (tmp_path / "pt" / "tokenizer.json").exists()
    from safetensors.numpy import load_file
    loaded = load_file(str(tmp_path / "pt" / "model.safetensors"))
    np.testing.assert_array_equal(loaded["bert.embeddings.word_embeddings.weight"],
                                  params["bert"]["embeddings"]["word_embeddings"]["embedding"])


@pytest.fixture(scope="module")
def base_mlm_params():
    return random_params(MosaicBertConfig.base(), "mlm", seed=7)


def test_base_folder_has_exactly_the_spec_keys_and_parity(tmp_path, base_mlm_params):
    config = MosaicBertConfig.base()
    export_torch_folder(tmp_path, base_mlm_params, config)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert shapes == spec_base_shapes()

    hf_config = json.loads((tmp_path / "config.json").read_text())
    for key, value in {"model_type": "bert", "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                       "vocab_size": 30528, "max_position_embeddings": 512,
                       "type_vocab_size": 2, "pad_token_id": 0, "hidden_dropout_prob": 0.1,
                       "attention_probs_dropout_prob": 0.0, "alibi_starting_size": 512}.items():
        assert hf_config[key] == value, key
    assert hf_config["auto_map"]["AutoConfig"] == "configuration_bert.BertConfig"
    assert hf_config["auto_map"]["AutoModelForMaskedLM"] == "bert_layers.BertForMaskedLM"

    torch_model = MosaicBertTorchForMaskedLM.from_pretrained(tmp_path)
    assert set(torch_model.state_dict()) == set(spec_base_shapes())
    assert_parity(config, "mlm", base_mlm_params, torch_model, lengths=[12, 7], seq=12)


def test_base_classification_parity(base_mlm_params):
    config = MosaicBertConfig.base(num_labels=3)
    head = random_params(MosaicBertConfig.tiny(hidden_size=768, num_attention_heads=12,
                                               num_labels=3), "classification", seed=8)
    params = {"bert": base_mlm_params["bert"], "pooler_dense": head["pooler_dense"],
              "classifier": head["classifier"]}
    state_dict = flax_to_torch_state_dict(params, config)
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= set(state_dict)
    assert not any(name.startswith("cls.") for name in state_dict)
    torch_model = MosaicBertTorchForSequenceClassification.from_state_dict(state_dict, config)
    assert_parity(config, "classification", params, torch_model, lengths=[12, 7], seq=12)


def test_large_mapping_covers_the_flax_tree():
    from mosaicbert_jax.param_layout import check_flax_params, expected_torch_shapes

    config = MosaicBertConfig.large()
    ids = jnp.zeros((1, 4), jnp.int32)
    for kind, model_cls in KINDS.items():
        shapes = jax.eval_shape(lambda: model_cls(config).init(jax.random.key(0), ids, ids))
        assert check_flax_params(shapes["params"], config) == kind
    torch_shapes = expected_torch_shapes(config, "mlm")
    assert torch_shapes["bert.encoder.layer.23.attention.self.Wqkv.weight"] == (3072, 1024)
    assert torch_shapes["bert.encoder.layer.23.mlp.gated_layers.weight"] == (8192, 1024)


def released_style_folder(path, params, config, decoder=True):
    """A folder laid out like mosaicml/mosaic-bert-base: pytorch_model.bin without the tied
    decoder weight, a non-parameter alibi buffer, a transformers BertConfig."""
    state_dict = {name: torch.from_numpy(value) for name, value in
                  flax_to_torch_state_dict(params, config).items()}
    if not decoder:
        del state_dict["cls.predictions.decoder.weight"]
    state_dict["bert.encoder.alibi"] = torch.zeros(1, config.num_attention_heads, 8, 8)
    path.mkdir()
    torch.save(state_dict, path / "pytorch_model.bin")
    hf_config = {"_name_or_path": "mosaicml/mosaic-bert", "architectures": ["BertForMaskedLM"],
                 "alibi_starting_size": 512, "attention_probs_dropout_prob": 0.0,
                 "auto_map": {"AutoConfig": "configuration_bert.BertConfig",
                              "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM"},
                 "classifier_dropout": None, "gradient_checkpointing": False,
                 "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                 "hidden_size": config.hidden_size, "initializer_range": 0.02,
                 "intermediate_size": config.intermediate_size, "layer_norm_eps": 1e-12,
                 "max_position_embeddings": 512, "model_type": "bert",
                 "num_attention_heads": config.num_attention_heads,
                 "num_hidden_layers": config.num_hidden_layers, "pad_token_id": 0,
                 "position_embedding_type": "absolute", "torch_dtype": "float32",
                 "transformers_version": "4.26.0", "type_vocab_size": 2, "use_cache": True,
                 "vocab_size": config.vocab_size}
    (path / "config.json").write_text(json.dumps(hf_config))
    return state_dict


def test_from_torch_released_layout_without_decoder_weight(tmp_path):
    config = TINY.replace(num_labels=2)
    params = random_params(config, "mlm", seed=3)
    released_style_folder(tmp_path / "release", params, config, decoder=False)
    assert main(["from-torch", "--src", str(tmp_path / "release"),
                 "--out", str(tmp_path / "jax")]) == 0
    back, loaded_config = load_pretrained(str(tmp_path / "jax"))
    assert loaded_config == config
    assert_trees_equal(params, back)
    torch_model = MosaicBertTorchForMaskedLM.from_pretrained(tmp_path / "release")
    assert_parity(config, "mlm", params, torch_model, lengths=[9, 4], seq=9)


def test_conversion_errors_name_the_problem(tmp_path):
    params = random_params(TINY, "mlm", seed=0)
    state_dict = flax_to_torch_state_dict(params, TINY)

    broken = dict(state_dict)
    del broken["bert.encoder.layer.0.mlp.wo.bias"]
    del broken["cls.predictions.transform.dense.weight"]
    broken["bert.encoder.layer.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as error:
        torch_state_dict_to_flax(broken, TINY)
    message = str(error.value)
    assert "missing 2 PyTorch parameters: ['bert.encoder.layer.0.mlp.wo.bias', " \
           "'cls.predictions.transform.dense.weight']" in message
    assert "unknown 1 PyTorch parameters: ['bert.encoder.layer.0.mlp.extra.weight']" in message

    untied = dict(state_dict, **{"cls.predictions.decoder.weight":
                                 state_dict["cls.predictions.decoder.weight"] + 1})
    with pytest.raises(ValueError, match="ties them"):
        torch_state_dict_to_flax(untied, TINY)

    with pytest.raises(ValueError, match=r"Wqkv.weight: \(288, 96\) \(expected \(576, 192\)\)"):
        torch_state_dict_to_flax(state_dict, TINY.replace(hidden_size=192))
    with pytest.raises(ValueError, match="2 encoder layers but the config says "
                                         "num_hidden_layers=4"):
        torch_state_dict_to_flax(state_dict, TINY.replace(num_hidden_layers=4))


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["to-torch", "--checkpoint", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "nope' does not exist" in capsys.readouterr().err

    params = random_params(TINY.replace(num_labels=2), "mlm", seed=0)
    released_style_folder(tmp_path / "release", params, TINY)
    hf_config = json.loads((tmp_path / "release" / "config.json").read_text())
    hf_config["intermediate_size"] = 1000
    (tmp_path / "release" / "config.json").write_text(json.dumps(hf_config))
    assert main(["from-torch", "--src", str(tmp_path / "release"),
                 "--out", str(tmp_path / "jax")]) == 2
    err = capsys.readouterr().err
    assert "intermediate_size=1000" in err and "mlp.gated_layers.weight: (512, 96)" in err

    with pytest.raises(SystemExit) as exit_info:
        main(["from-torch", "--help"])
    assert exit_info.value.code == 0
    assert "mosaic-bert-base" in build_parser().format_help()


def test_hf_config_round_trip_and_released_config():
    for kind in ("mlm", "classification"):
        config = config_from_hf_json(config_to_hf_json(TINY, kind))
        assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers,
                config.intermediate_size, config.vocab_size, config.num_labels) == (
            96, 12, 2, 256, 320, 3)
    assert config_to_hf_json(TINY, "classification")["id2label"] == {
        "0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        config_from_hf_json({**config_to_hf_json(TINY, "mlm"), "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match=r"lacks the architecture sizes \['hidden_size'\]"):
        config_from_hf_json({k: v for k, v in config_to_hf_json(TINY, "mlm").items()
                             if k != "hidden_size"})


def test_importing_the_package_does_not_import_torch():
    code = ("import sys, mosaicbert_jax, mosaicbert_jax.convert, mosaicbert_jax.checkpoint; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_damaged_source_files_are_named(tmp_path, capsys):
    params = random_params(TINY.replace(num_labels=2), "mlm", seed=0)
    released_style_folder(tmp_path / "bin", params, TINY)  # pytorch_model.bin
    weights = tmp_path / "bin" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:5000])  # an interrupted download
    assert main(["from-torch", "--src", str(tmp_path / "bin"), "--out", str(tmp_path / "a")]) == 2
    line = _one_error_line(capsys)
    assert f"{weights} could not be read" in line and "damaged or incomplete" in line

    export_torch_folder(tmp_path / "st", params, TINY.replace(num_labels=2))
    weights = tmp_path / "st" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["from-torch", "--src", str(tmp_path / "st"), "--out", str(tmp_path / "b")]) == 2
    line = _one_error_line(capsys)
    assert f"{weights} could not be read" in line and "fetch it again" in line

    config_file = tmp_path / "st" / "config.json"
    config_file.write_text(config_file.read_text()[:40])
    assert main(["from-torch", "--src", str(tmp_path / "st"), "--out", str(tmp_path / "c")]) == 2
    assert f"{config_file} is not valid JSON" in _one_error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_from_torch_copies_the_tokenizer_or_names_the_one_expected(tmp_path, capsys):
    config = TINY.replace(num_labels=2)
    params = random_params(config, "mlm", seed=0)
    export_torch_folder(tmp_path / "src", params, config)
    assert main(["from-torch", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "has no tokenizer file" in err and "vocab_size 320" in err
    base_sized = config.replace(vocab_size=30528, hidden_size=24, num_attention_heads=2,
                                intermediate_size=32, num_hidden_layers=1)
    export_torch_folder(tmp_path / "base", random_params(base_sized, "mlm", seed=0), base_sized)
    assert main(["from-torch", "--src", str(tmp_path / "base"), "--out", str(tmp_path / "b")]) == 0
    assert "bert-base-uncased" in capsys.readouterr().err

    (tmp_path / "src" / "tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "src" / "vocab.txt").write_text("[PAD]\n[MASK]\n")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    assert main(["from-torch", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "c")]) == 0
    assert "no tokenizer" not in capsys.readouterr().err
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (tmp_path / "c" / name).read_text() == (tmp_path / "src" / name).read_text()


def test_bf16_export_says_bfloat16_and_keeps_it_through_a_round_trip(tmp_path):
    config = TINY.replace(num_labels=2)
    export_torch_folder(tmp_path / "bf16", random_params(config, "mlm", 0, jnp.bfloat16), config)
    hf_config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert hf_config["torch_dtype"] == "bfloat16"
    assert main(["from-torch", "--src", str(tmp_path / "bf16"), "--out", str(tmp_path / "jax")]) == 0
    assert main(["to-torch", "--checkpoint", str(tmp_path / "jax"),
                 "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    export_torch_folder(tmp_path / "f32", random_params(config, "mlm", 0), config)
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_exported_weights_are_readable_like_the_other_files(tmp_path):
    old = os.umask(0o022)
    try:
        config = TINY.replace(num_labels=2)
        export_torch_folder(tmp_path / "out", random_params(config, "mlm", 0), config)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
