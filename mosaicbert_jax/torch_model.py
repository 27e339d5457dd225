"""Plain PyTorch MosaicBERT for inference on converted weights (optional: needs torch).

Computes what the reference computes, with the reference's parameter names, without its
Triton kernel, unpadding helpers or remote code: padded attention with the ALiBi bias and
-10000 added to padded keys, exact GELU, post-LN, GLU MLP. Hidden states of padded positions
are zeroed, as the reference's re-padding leaves them.

    model = MosaicBertTorchForMaskedLM.from_pretrained("converted/")
    logits = model(input_ids, attention_mask)            # [batch, seq, vocab]
"""

from __future__ import annotations

import math
import os
from typing import Any

from mosaicbert_jax import param_layout
from mosaicbert_jax.attention.alibi import alibi_slopes
from mosaicbert_jax.config import MLM_HEAD_LAYER_NORM_EPS, MosaicBertConfig

torch = param_layout.import_torch()
nn = torch.nn
F = torch.nn.functional

# What the reference adds to the scores of padded keys.
PAD_BIAS = -10000.0


def alibi_bias(num_heads: int, seq_len: int, device: Any = None) -> "torch.Tensor":
    """[heads, seq, seq] bias -slope_h * |i - j| with the spec's slopes."""
    slopes = torch.as_tensor(alibi_slopes(num_heads), device=device)
    position = torch.arange(seq_len, device=device)
    distance = (position[None, :] - position[:, None]).abs().to(slopes.dtype)
    return -slopes[:, None, None] * distance[None]


class MosaicBertTorchEmbeddings(nn.Module):
    """Word + token-type embeddings, LayerNorm, dropout (no position embeddings)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class MosaicBertTorchSelfAttention(nn.Module):
    """Fused QKV (output laid out (3, heads, head_dim)), softmax(q k^T / sqrt(d) + bias) v."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x, bias):
        batch, seq, hidden = x.shape
        qkv = self.Wqkv(x).view(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, seq, head_dim]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
        probs = self.dropout(scores.softmax(dim=-1))
        return (probs @ v).transpose(1, 2).reshape(batch, seq, hidden)


class MosaicBertTorchSelfOutput(nn.Module):
    """Output dense, dropout, residual add, post-LN."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class MosaicBertTorchAttention(nn.Module):
    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.self = MosaicBertTorchSelfAttention(config)
        self.output = MosaicBertTorchSelfOutput(config)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class MosaicBertTorchGatedMLP(nn.Module):
    """gelu(first half) * second half of a bias-free projection, wo, residual, post-LN."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size,
                                      bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        gated, non_gated = self.gated_layers(x).split(self.intermediate_size, dim=-1)
        h = self.dropout(F.gelu(gated, approximate="none") * non_gated)
        return self.layernorm(self.wo(h) + x)


class MosaicBertTorchLayer(nn.Module):
    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.attention = MosaicBertTorchAttention(config)
        self.mlp = MosaicBertTorchGatedMLP(config)

    def forward(self, x, bias):
        return self.mlp(self.attention(x, bias))


class MosaicBertTorchEncoder(nn.Module):
    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.layer = nn.ModuleList(MosaicBertTorchLayer(config)
                                   for _ in range(config.num_hidden_layers))

    def forward(self, x, attention_mask):
        mask = attention_mask.to(x.dtype)
        seq = x.shape[1]
        bias = (alibi_bias(self.num_heads, seq, x.device).to(x.dtype)[None]
                + (1.0 - mask)[:, None, None, :] * PAD_BIAS)
        for layer in self.layer:
            x = layer(x, bias)
        return x * mask[..., None]


class MosaicBertTorchPooler(nn.Module):
    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class MosaicBertTorchModel(nn.Module):
    """Embeddings + encoder (+ pooler). Returns hidden states [batch, seq, hidden]."""

    def __init__(self, config: MosaicBertConfig, add_pooling_layer: bool = False):
        super().__init__()
        self.embeddings = MosaicBertTorchEmbeddings(config)
        self.encoder = MosaicBertTorchEncoder(config)
        self.pooler = MosaicBertTorchPooler(config) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, attention_mask)


class MosaicBertTorchPredictionHeadTransform(nn.Module):
    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=MLM_HEAD_LAYER_NORM_EPS)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x), approximate="none"))


class MosaicBertTorchLMPredictionHead(nn.Module):
    """Transform, then the decoder whose weight is the word-embedding matrix (tied)."""

    def __init__(self, config: MosaicBertConfig, word_embeddings: "nn.Parameter"):
        super().__init__()
        self.transform = MosaicBertTorchPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings

    def forward(self, x):
        return self.decoder(self.transform(x))


class MosaicBertTorchOnlyMLMHead(nn.Module):
    def __init__(self, config: MosaicBertConfig, word_embeddings: "nn.Parameter"):
        super().__init__()
        self.predictions = MosaicBertTorchLMPredictionHead(config, word_embeddings)

    def forward(self, x):
        return self.predictions(x)


class _Pretrained(nn.Module):
    """from_pretrained for the task models: build on the meta device, then take the weights."""

    model_kind = ""

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], config: MosaicBertConfig,
                        dtype: "torch.dtype" = torch.float32) -> "_Pretrained":
        """A model in eval mode holding `state_dict` (validated, the tied weight filled in)."""
        model_kind, arrays = param_layout.canonical_torch_state_dict(state_dict, config)
        if model_kind != cls.model_kind:
            raise ValueError(f"these weights are a {model_kind} model; load them with the "
                             f"{_CLASSES[model_kind].__name__} class, not {cls.__name__}")
        with torch.device("meta"):
            model = cls(config)
        tensors = {name: torch.from_numpy(array.copy()).to(dtype)
                   for name, array in arrays.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
        model.tie_weights()
        return model.eval()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike,
                        dtype: "torch.dtype" = torch.float32) -> "_Pretrained":
        """Loads config.json + model.safetensors (or pytorch_model.bin) from `folder`."""
        state_dict, hf_config = param_layout.read_torch_folder(folder)
        return cls.from_state_dict(state_dict, param_layout.config_from_hf_json(hf_config), dtype)

    def tie_weights(self) -> None:
        """Nothing is tied by default."""


class MosaicBertTorchForMaskedLM(_Pretrained):
    """Encoder + MLM head; forward returns logits [batch, seq, vocab]."""

    model_kind = "mlm"

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.config = config
        self.bert = MosaicBertTorchModel(config, add_pooling_layer=False)
        self.cls = MosaicBertTorchOnlyMLMHead(config, self.bert.embeddings.word_embeddings.weight)

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.cls(self.bert(input_ids, attention_mask, token_type_ids))


class MosaicBertTorchForSequenceClassification(_Pretrained):
    """Encoder + pooler (first token) + dropout + classifier; returns [batch, num_labels]."""

    model_kind = "classification"

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.config = config
        self.bert = MosaicBertTorchModel(config, add_pooling_layer=True)
        rate = (config.classifier_dropout_prob if config.classifier_dropout_prob is not None
                else config.hidden_dropout_prob)
        self.dropout = nn.Dropout(rate)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(self.bert.pooler(hidden)))


_CLASSES = {"mlm": MosaicBertTorchForMaskedLM,
            "classification": MosaicBertTorchForSequenceClassification}


def load_torch_model(folder: str | os.PathLike,
                     dtype: "torch.dtype" = torch.float32) -> _Pretrained:
    """The MLM or classification model a converted folder holds, whichever it is."""
    state_dict, hf_config = param_layout.read_torch_folder(folder)
    model_kind = param_layout.infer_torch_model_kind(param_layout.strip_composer_prefix(state_dict))
    return _CLASSES[model_kind].from_state_dict(state_dict,
                                                param_layout.config_from_hf_json(hf_config), dtype)


__all__ = ["MosaicBertTorchForMaskedLM", "MosaicBertTorchForSequenceClassification",
           "MosaicBertTorchModel", "alibi_bias", "load_torch_model"]
