"""MosaicBertConfig checks attention names against the attention registry, not a list of its own."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicbert_jax import MosaicBertConfig, MosaicBertModel
from mosaicbert_jax.attention import register_implementation, xla_attention
from mosaicbert_jax.train import model_config_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_configs_accept_pallas_tpu():
    assert MosaicBertConfig.tiny(attention_implementation="pallas_tpu") \
        .attention_implementation == "pallas_tpu"
    config = load_config("tpu_v5e")
    config.model.attention_implementation = "pallas_tpu"
    assert model_config_from(config, 30528).attention_implementation == "pallas_tpu"


def test_a_registered_implementation_is_accepted_and_used():
    calls = []

    def counting_attention(q, k, v, segment_ids, slopes, scale):
        calls.append(q.shape)
        return xla_attention(q, k, v, segment_ids, slopes, scale)

    register_implementation("test_counting_attention", counting_attention)
    config = MosaicBertConfig.tiny(vocab_size=64,
                                   attention_implementation="test_counting_attention")
    ids = jnp.asarray(np.arange(16, dtype=np.int32).reshape(2, 8) % 60 + 4)
    model = MosaicBertModel(config)
    variables = model.init(jax.random.key(0), ids, jnp.ones_like(ids))
    model.apply(variables, ids, jnp.ones_like(ids))
    assert len(calls) >= config.num_hidden_layers  # every layer went through it


def test_an_unknown_implementation_names_the_registry():
    with pytest.raises(ValueError, match="'magic'.*register_implementation"):
        MosaicBertConfig.tiny(attention_implementation="magic")
