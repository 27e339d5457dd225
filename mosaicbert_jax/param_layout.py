"""The Flax parameter layout of MosaicBERT and its PyTorch (Hugging Face) twin.

The one home of: the model kinds and how to tell them from a params tree, the check that a tree
holds exactly a config's parameters, the Flax <-> PyTorch name mapping, the Hugging Face
`config.json` <-> MosaicBertConfig mapping and reading a PyTorch folder. numpy in, numpy out.

Names and shapes follow the reference checkpoint (spec: "PyTorch parameter names"). Linear
weights are (out, in), Flax kernels (in, out): a transpose. The fused QKV output is laid out
(3, heads, head_dim) in both, so it needs nothing more. The MLM decoder weight is the word
embedding matrix (tied); it is written as its own copy because safetensors cannot alias.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Optional

import numpy as np
from etils import epath

from mosaicbert_jax.cli_errors import UserError
from mosaicbert_jax.config import MosaicBertConfig

Params = Any
StateDict = dict[str, np.ndarray]

MODEL_KINDS = ("mlm", "classification")
# A Hugging Face folder: its config.json and the weight files it may hold (first: what we write).
CONFIG_FILE = "config.json"
TORCH_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def infer_model_kind(params: Params) -> str:
    """'mlm' if the tree has the MLM head `cls`, 'classification' if it has `classifier`."""
    if not hasattr(params, "keys"):
        raise ValueError(f"params must be the Flax params dict; got {type(params).__name__}")
    has_mlm, has_cls = "cls" in params, "classifier" in params
    if has_mlm == has_cls:
        raise ValueError(f"cannot tell the model kind from top-level params {sorted(params)}: "
                         f"expected exactly one of 'cls' (MLM head) or 'classifier'")
    return "mlm" if has_mlm else "classification"


def unwrap_variables(params: Params) -> Params:
    """Accepts {'params': tree} (a Flax variables dict) as well as the params tree itself."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


DECODER_WEIGHT = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
# Buffers (not parameters) that reference checkpoints may carry; recomputed, so ignored.
_IGNORED_BUFFERS = (re.compile(r"(^|\.)alibi$"),
                    re.compile(r"^bert\.embeddings\.(position_ids|token_type_ids)$"))
# The reference's own model files, named by auto_map; a converted folder mirrors the release.
_AUTO_MAP = {"AutoConfig": "configuration_bert.BertConfig",
             "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM"}
_AUTO_MAP_CLASSIFICATION = {
    "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification"}
_ARCHITECTURES = {"mlm": "BertForMaskedLM", "classification": "BertForSequenceClassification"}
ALIBI_STARTING_SIZE = 512
MAX_POSITION_EMBEDDINGS = 512


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """One PyTorch tensor: its name, PyTorch shape, Flax path and whether it is transposed."""

    torch_name: str
    flax_path: tuple[str, ...]
    torch_shape: tuple[int, ...]
    transpose: bool = False

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.torch_shape[::-1] if self.transpose else self.torch_shape


def _linear(torch_prefix: str, flax_prefix: tuple[str, ...], out_dim: int, in_dim: int,
            bias: bool = True) -> list[ParamMapping]:
    maps = [ParamMapping(f"{torch_prefix}.weight", flax_prefix + ("kernel",), (out_dim, in_dim),
                         transpose=True)]
    if bias:
        maps.append(ParamMapping(f"{torch_prefix}.bias", flax_prefix + ("bias",), (out_dim,)))
    return maps


def _layer_norm(torch_prefix: str, flax_prefix: tuple[str, ...], dim: int) -> list[ParamMapping]:
    return [ParamMapping(f"{torch_prefix}.weight", flax_prefix + ("scale",), (dim,)),
            ParamMapping(f"{torch_prefix}.bias", flax_prefix + ("bias",), (dim,))]


def param_mappings(config: MosaicBertConfig, model_kind: str) -> list[ParamMapping]:
    """Every tensor of the PyTorch checkpoint, in the reference's order (decoder weight excluded:
    it is the tied word-embedding matrix)."""
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind={model_kind!r} is not one of {MODEL_KINDS}")
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    emb = ("bert", "embeddings")
    maps = [
        ParamMapping(WORD_EMBEDDINGS, emb + ("word_embeddings", "embedding"), (v, h)),
        ParamMapping("bert.embeddings.token_type_embeddings.weight",
                     emb + ("token_type_embeddings", "embedding"), (config.type_vocab_size, h)),
        *_layer_norm("bert.embeddings.LayerNorm", emb + ("LayerNorm",), h),
    ]
    for n in range(config.num_hidden_layers):
        t, f = f"bert.encoder.layer.{n}", ("bert", "encoder", f"layer_{n}")
        maps += [
            *_linear(f"{t}.attention.self.Wqkv", f + ("attention_self", "Wqkv"), 3 * h, h),
            *_linear(f"{t}.attention.output.dense", f + ("attention_output", "dense"), h, h),
            *_layer_norm(f"{t}.attention.output.LayerNorm", f + ("attention_output", "LayerNorm"),
                         h),
            *_linear(f"{t}.mlp.gated_layers", f + ("mlp", "gated_layers"), 2 * i, h, bias=False),
            *_linear(f"{t}.mlp.wo", f + ("mlp", "wo"), h, i),
            *_layer_norm(f"{t}.mlp.layernorm", f + ("mlp", "layernorm"), h),
        ]
    if model_kind == "mlm":
        maps += [
            *_linear("cls.predictions.transform.dense", ("cls", "transform_dense"), h, h),
            *_layer_norm("cls.predictions.transform.LayerNorm", ("cls", "transform_LayerNorm"), h),
            ParamMapping("cls.predictions.decoder.bias", ("cls", "decoder_bias"), (v,)),
        ]
    else:
        maps += [*_linear("bert.pooler.dense", ("pooler_dense",), h, h),
                 *_linear("classifier", ("classifier",), config.num_labels, h)]
    return maps


def expected_torch_shapes(config: MosaicBertConfig, model_kind: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a converted checkpoint, the tied decoder weight included for MLM."""
    shapes = {m.torch_name: m.torch_shape for m in param_mappings(config, model_kind)}
    if model_kind == "mlm":
        shapes[DECODER_WEIGHT] = (config.vocab_size, config.hidden_size)
    return shapes


def _flatten(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if hasattr(tree, "items"):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, prefix + (str(key),)))
        return flat
    return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def describe_sizes(config: MosaicBertConfig) -> str:
    """The config's architecture sizes, for messages about weights that do not fit."""
    return (f"vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
            f"num_hidden_layers={config.num_hidden_layers}, "
            f"intermediate_size={config.intermediate_size}, "
            f"type_vocab_size={config.type_vocab_size}, num_labels={config.num_labels}")


def _check_names(present: Iterable[str], expected: Iterable[str], what: str) -> None:
    present, expected = set(present), set(expected)
    missing, unknown = sorted(expected - present), sorted(present - expected)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} {what}: {missing}")
    if unknown:
        problems.append(f"unknown {len(unknown)} {what}: {unknown}")
    if problems:
        raise ValueError("; ".join(problems))


def _check_shapes(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  config: MosaicBertConfig, source: str) -> None:
    wrong = [f"{name}: {tuple(shapes[name])} (expected {expected[name]})"
             for name in expected if name in shapes and tuple(shapes[name]) != expected[name]]
    if wrong:
        raise ValueError(f"{source} do not match the config ({describe_sizes(config)}): "
                         + "; ".join(wrong) + ". Are the config's sizes right for these weights?")


def check_flax_params(params: Params, config: MosaicBertConfig) -> str:
    """Checks a Flax params tree has exactly the config's parameters; returns the model kind."""
    model_kind = infer_model_kind(params)
    maps = param_mappings(config, model_kind)
    flat = {"/".join(path): value for path, value in _flatten(params).items()}
    expected = {"/".join(m.flax_path): m.flax_shape for m in maps}
    _check_layer_count(flat, config, r"^bert/encoder/layer_(\d+)/")
    _check_names(flat, expected, "Flax parameters")
    _check_shapes({k: _shape(v) for k, v in flat.items()}, expected, config,
                  "Flax parameter shapes")
    return model_kind


def _shape(value: Any) -> tuple[int, ...]:
    """Shape of an array or of a jax.ShapeDtypeStruct (so abstract trees can be checked)."""
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _check_layer_count(names: Iterable[str], config: MosaicBertConfig, pattern: str) -> None:
    layers = {int(m.group(1)) for name in names if (m := re.match(pattern, name))}
    if layers and len(layers) != config.num_hidden_layers:
        raise ValueError(f"the weights have {len(layers)} encoder layers but the config says "
                         f"num_hidden_layers={config.num_hidden_layers}")


def flax_to_torch_state_dict(params: Params, config: MosaicBertConfig) -> StateDict:
    """Flax params tree -> {PyTorch name: numpy array} in the reference layout (dtype kept)."""
    params = unwrap_variables(params)
    model_kind = check_flax_params(params, config)
    flat = _flatten(params)
    state_dict = {}
    for m in param_mappings(config, model_kind):
        value = np.asarray(flat[m.flax_path])
        state_dict[m.torch_name] = np.ascontiguousarray(value.T if m.transpose else value)
    if model_kind == "mlm":
        state_dict[DECODER_WEIGHT] = state_dict[WORD_EMBEDDINGS].copy()
    return state_dict


def _to_numpy(value: Any) -> np.ndarray:
    """numpy view of an array or torch tensor (bf16 tensors go to float32: numpy has no bf16)."""
    if hasattr(value, "detach"):  # a torch tensor; torch is only imported by whoever made it
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def strip_composer_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drops a 'model.' prefix that Composer checkpoints put on every name."""
    if state_dict and all(name.startswith("model.") for name in state_dict):
        return {name[len("model."):]: value for name, value in state_dict.items()}
    return state_dict


def infer_torch_model_kind(names: Iterable[str]) -> str:
    """'mlm' for names under `cls.`, 'classification' for `classifier.`."""
    names = list(names)
    has_mlm = any(name.startswith("cls.") for name in names)
    has_cls = any(name.startswith("classifier.") for name in names)
    if has_mlm == has_cls:
        raise ValueError("cannot tell the model kind from the checkpoint: expected names under "
                         "exactly one of 'cls.' (MLM head) or 'classifier.' (classification); "
                         f"got {'both' if has_mlm else 'neither'}")
    return "mlm" if has_mlm else "classification"


def canonical_torch_state_dict(state_dict: dict[str, Any],
                               config: MosaicBertConfig) -> tuple[str, StateDict]:
    """Validates a PyTorch state dict against the config; returns (model kind, exactly the spec's
    names as numpy arrays, the tied decoder weight filled in)."""
    state_dict = strip_composer_prefix(dict(state_dict))
    state_dict = {name: value for name, value in state_dict.items()
                  if not any(p.search(name) for p in _IGNORED_BUFFERS)}
    model_kind = infer_torch_model_kind(state_dict)
    expected = expected_torch_shapes(config, model_kind)
    _check_layer_count(state_dict, config, r"^bert\.encoder\.layer\.(\d+)\.")
    present = set(state_dict)
    if model_kind == "mlm":
        present.add(DECODER_WEIGHT)  # optional: tied to the word embeddings
    _check_names(present, expected, "PyTorch parameters")
    arrays = {name: _to_numpy(value) for name, value in state_dict.items()}
    _check_shapes({k: v.shape for k, v in arrays.items()}, expected, config,
                  "PyTorch parameter shapes")
    if model_kind == "mlm":
        decoder = arrays.get(DECODER_WEIGHT)
        if decoder is not None and not np.array_equal(decoder, arrays[WORD_EMBEDDINGS]):
            raise ValueError(f"{DECODER_WEIGHT} differs from {WORD_EMBEDDINGS}, but MosaicBERT "
                             f"ties them; this checkpoint is not a MosaicBERT MLM model")
        arrays[DECODER_WEIGHT] = arrays[WORD_EMBEDDINGS]
    return model_kind, {name: arrays[name] for name in expected}


def torch_state_dict_to_flax(state_dict: dict[str, Any], config: MosaicBertConfig) -> Params:
    """{PyTorch name: array} in the reference layout -> Flax params tree of numpy arrays."""
    model_kind, arrays = canonical_torch_state_dict(state_dict, config)
    flat = {}
    for m in param_mappings(config, model_kind):
        value = arrays[m.torch_name]
        flat[m.flax_path] = np.ascontiguousarray(value.T if m.transpose else value)
    return _unflatten(flat)


def config_to_hf_json(config: MosaicBertConfig, model_kind: str,
                      num_labels: Optional[int] = None,
                      torch_dtype: str = "float32") -> dict[str, Any]:
    """A transformers BertConfig dict as the released MosaicBERT checkpoint has it;
    `torch_dtype` names the dtype of the weights written beside it."""
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind={model_kind!r} is not one of {MODEL_KINDS}")
    values: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_kind]],
        "model_type": "bert",
        "auto_map": dict(_AUTO_MAP),
        "alibi_starting_size": ALIBI_STARTING_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "classifier_dropout": config.classifier_dropout_prob,
        "layer_norm_eps": config.layer_norm_eps,
        "type_vocab_size": config.type_vocab_size,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "torch_dtype": torch_dtype,
    }
    if model_kind == "classification":
        values["auto_map"].update(_AUTO_MAP_CLASSIFICATION)
    labels = config.num_labels if num_labels is None else num_labels
    values["id2label"] = {str(k): f"LABEL_{k}" for k in range(labels)}
    values["label2id"] = {f"LABEL_{k}": k for k in range(labels)}
    return values


_HF_REQUIRED = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers",
                "intermediate_size")
_HF_OPTIONAL = {"hidden_dropout_prob": "hidden_dropout_prob",
                "attention_probs_dropout_prob": "attention_probs_dropout_prob",
                "layer_norm_eps": "layer_norm_eps", "type_vocab_size": "type_vocab_size",
                "pad_token_id": "pad_token_id", "initializer_range": "initializer_range",
                "classifier_dropout": "classifier_dropout_prob"}


def config_from_hf_json(values: dict[str, Any]) -> MosaicBertConfig:
    """Our config from a transformers BertConfig dict (fields it lacks keep our defaults)."""
    if values.get("model_type", "bert") != "bert":
        raise ValueError(f"config.json has model_type={values['model_type']!r}; MosaicBERT "
                         f"checkpoints are 'bert'")
    if values.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json has hidden_act={values['hidden_act']!r}; MosaicBERT uses "
                         f"exact 'gelu'")
    missing = [key for key in _HF_REQUIRED if key not in values]
    if missing:
        raise ValueError(f"config.json lacks the architecture sizes {missing}")
    fields = {key: values[key] for key in _HF_REQUIRED}
    fields.update({ours: values[theirs] for theirs, ours in _HF_OPTIONAL.items()
                   if values.get(theirs) is not None})
    if "num_labels" in values:
        fields["num_labels"] = values["num_labels"]
    elif "id2label" in values:
        fields["num_labels"] = len(values["id2label"])
    return MosaicBertConfig(**fields)


def read_torch_folder(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict as numpy, config.json dict) of a folder with model.safetensors or
    pytorch_model.bin (the latter needs torch)."""
    directory = epath.Path(src)
    if not directory.is_dir():
        raise ValueError(f"PyTorch checkpoint folder {os.fspath(src)!r} does not exist")
    config_file = directory / CONFIG_FILE
    if not config_file.exists():
        raise ValueError(f"{os.fspath(src)!r} has no {CONFIG_FILE}")
    try:
        hf_config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file} is not valid JSON ({error}); fix it or copy the "
                        f"model's {CONFIG_FILE} again") from error
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_file} holds a JSON {type(hf_config).__name__}, not the "
                        f"object of a model config")
    safetensors_file, bin_file = (directory / name for name in TORCH_WEIGHT_FILES)
    if safetensors_file.exists():
        from safetensors.numpy import load_file

        try:
            return load_file(os.fspath(safetensors_file)), hf_config
        except Exception as error:  # safetensors raises its own SafetensorError
            raise _damaged(safetensors_file, error) from error
    if bin_file.exists():
        torch = import_torch()
        try:
            state_dict = torch.load(os.fspath(bin_file), map_location="cpu", weights_only=True)
        except Exception as error:  # OSError, RuntimeError, pickle errors: a damaged file
            raise _damaged(bin_file, error) from error
        state_dict = state_dict.get("state_dict", state_dict)
        return {name: _to_numpy(value) for name, value in state_dict.items()}, hf_config
    raise ValueError(f"{os.fspath(src)!r} has neither of {list(TORCH_WEIGHT_FILES)}")


def _damaged(path: epath.Path, error: BaseException) -> UserError:
    """The one-line error for a weights file that does not read: truncated or not weights."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return UserError(f"{path} could not be read ({type(error).__name__}: {reason}); the file is "
                     f"damaged or incomplete, e.g. an interrupted download: fetch it again")


def weights_dtype_name(state_dict: StateDict) -> str:
    """The torch_dtype name for config.json: the dtype of the floating-point weights."""
    names = {np.dtype(v.dtype).name for v in state_dict.values()
             if np.issubdtype(v.dtype, np.floating) or np.dtype(v.dtype).name == "bfloat16"}
    if len(names) == 1:
        return names.pop()
    return "float32" if not names or "float32" in names else sorted(names)[0]


def import_torch() -> Any:
    """torch, or an ImportError saying how to install it."""
    try:
        import torch
    except ImportError as error:
        raise ImportError("this needs PyTorch; install it with `pip install "
                          "mosaicbert-jax[torch]`") from error
    return torch
