"""MosaicBERT in Flax linen: ALiBi attention, fused QKV, gated-GELU MLP, post-LN, sparse MLM head.

Rows are packed: `segment_ids` number the documents in a row (1..n) and mark padding with 0.
Attention never crosses a segment; ALiBi distances are within a document because other
documents are masked, so packing gives each document exactly its standalone output.
Module and parameter names follow the PyTorch reference so conversion is a rename.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mosaicbert_jax import fp8, fused
from mosaicbert_jax.attention import alibi_slopes, attention_qkv, resolve_implementation
from mosaicbert_jax.config import MLM_HEAD_LAYER_NORM_EPS, MosaicBertConfig
from mosaicbert_jax.dropout import Dropout
from mosaicbert_jax.fused import fp8_attention, fp8_dense, fp8_mlp
from mosaicbert_jax.fused.reference import gelu


def _dense_init(config: MosaicBertConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def _big_dense(cfg: MosaicBertConfig, features: int, name: str, use_bias: bool = True):
    """nn.Dense for the encoder's large GEMMs: FP8 matmuls when cfg.fp8 (same params)."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=_dense_init(cfg), dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, name=name,
                    dot_general_cls=fp8.dot_general_cls(cfg.fp8, cfg.fp8_amax_history,
                                                        cfg.fp8_gemm))


def check_inputs(config: MosaicBertConfig, input_ids: Any, segment_ids: Any,
                 token_type_ids: Any = None) -> None:
    """Raises ValueError for malformed inputs; value checks run only on concrete arrays."""
    ids_shape, seg_shape = np.shape(input_ids), np.shape(segment_ids)
    if len(ids_shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {ids_shape}")
    if seg_shape != ids_shape:
        raise ValueError(f"segment_ids shape {seg_shape} does not match input_ids shape "
                         f"{ids_shape}; give one segment id per token (0 = padding)")
    if token_type_ids is not None and np.shape(token_type_ids) != ids_shape:
        raise ValueError(f"token_type_ids shape {np.shape(token_type_ids)} does not match "
                         f"input_ids shape {ids_shape}")
    if config.max_sequence_length is not None and ids_shape[1] > config.max_sequence_length:
        raise ValueError(f"sequence length {ids_shape[1]} exceeds max_sequence_length="
                         f"{config.max_sequence_length}; pack shorter rows or raise the limit")
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        bad = ids[(ids < 0) | (ids >= config.vocab_size)].flat[0]
        raise ValueError(f"input id {bad} is outside the vocabulary [0, {config.vocab_size}); "
                         f"check the tokenizer matches the model's vocab_size")
    if token_type_ids is not None and not isinstance(token_type_ids, jax.core.Tracer):
        types = np.asarray(token_type_ids)
        if types.size and (types.min() < 0 or types.max() >= config.type_vocab_size):
            raise ValueError(f"token_type_ids must lie in [0, {config.type_vocab_size})")


class Lookup(nn.Module):
    """An embedding table (param 'embedding', like nn.Embed) looked up for speed on GPU.

    Large tables gather from the float32 table, so the backward scatter-adds in float32
    (bf16 scatter-add falls back to slow compare-and-swap loops). Small tables (token types)
    use a one-hot matmul: a scatter into 2 rows would serialise on atomics.
    """

    num_embeddings: int
    features: int
    config: MosaicBertConfig

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        table = self.param("embedding", _dense_init(cfg), (self.num_embeddings, self.features),
                           cfg.param_dtype)
        if self.num_embeddings <= 16:
            one_hot = jax.nn.one_hot(ids, self.num_embeddings, dtype=cfg.dtype)
            return jnp.einsum("...v,vh->...h", one_hot, table.astype(cfg.dtype))
        return jnp.take(table, ids, axis=0).astype(cfg.dtype)


class MosaicBertEmbeddings(nn.Module):
    """Word + token-type embeddings (no positions: ALiBi carries order), LayerNorm, dropout."""

    config: MosaicBertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        cfg = self.config
        x = Lookup(cfg.vocab_size, cfg.hidden_size, cfg, name="word_embeddings")(input_ids)
        x = x + Lookup(cfg.type_vocab_size, cfg.hidden_size, cfg,
                       name="token_type_embeddings")(token_type_ids)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name="LayerNorm")(x)
        return Dropout(cfg.hidden_dropout_prob, cfg.dropout_rng)(x, deterministic)


class MosaicBertSelfAttention(nn.Module):
    """Fused QKV projection (output laid out (3, heads, head_dim)) and ALiBi attention;
    window > 0: sliding-window attention (keys with |i - j| <= window)."""

    config: MosaicBertConfig
    window: int = 0

    @nn.compact
    def __call__(self, x, segment_ids):
        cfg = self.config
        batch, seq, _ = x.shape
        slopes = jnp.asarray(alibi_slopes(cfg.num_attention_heads))
        attention_impl = resolve_implementation(cfg.attention_implementation)
        if cfg.fp8 and fp8_attention.resolve_use(cfg.fp8_qkv_grad_in_attention,
                                                 fp8.dense_op_roles(cfg.fp8_gemm),
                                                 attention_impl, seq, cfg.head_dim):
            kernel, bias, stats = DenseVariables(3 * cfg.hidden_size, cfg, name="Wqkv")(
                x.shape[-1])
            if stats is not None:  # training: one op, whose backward writes float8 d(qkv)
                return fp8_attention.qkv_attention(
                    x, kernel, bias, stats, segment_ids, slopes,
                    heads=cfg.num_attention_heads, attention_implementation=attention_impl,
                    quantize_implementation=_fused_impl("glu_implementation", cfg,
                                                        x.shape[-1]),
                    window=self.window, dtype=cfg.dtype)
            qkv = jax.lax.dot_general(x.astype(cfg.dtype), kernel.astype(cfg.dtype),
                                      (((x.ndim - 1,), (0,)), ((), ())))
        else:
            qkv, bias = DenseBiasApart(3 * cfg.hidden_size, cfg, fp8_role="qkv",
                                       name="Wqkv")(x)
        qkv = qkv.reshape(batch, seq, 3, cfg.num_attention_heads, cfg.head_dim)
        # Kernels with a fused-QKV entry read q, k, v in place (no slice copies, one d(qkv))
        # and add the bias as they read them (no bias-add pass over qkv).
        out = attention_qkv(qkv, segment_ids, slopes,
                            implementation=cfg.attention_implementation, window=self.window,
                            bias=bias.astype(cfg.dtype))
        return out.reshape(batch, seq, cfg.hidden_size)


class LayerNormParams(nn.Module):
    """The scale and bias of an nn.LayerNorm (same names and inits), for the fused kernels."""

    config: MosaicBertConfig

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        features = (cfg.hidden_size,)
        return (self.param("scale", nn.initializers.ones, features, cfg.param_dtype),
                self.param("bias", nn.initializers.zeros, features, cfg.param_dtype))


def _fused_impl(name: str, cfg: MosaicBertConfig, width: int) -> str:
    return fused.resolve(getattr(cfg, name), width, cfg.dropout_rng)


def _dense_params(module: nn.Module, cfg: MosaicBertConfig, in_features: int, features: int,
                  use_bias: bool = True) -> tuple[jax.Array, Optional[jax.Array]]:
    """nn.Dense's kernel and bias (same names, shapes, inits), declared in `module`."""
    kernel = module.param("kernel", _dense_init(cfg), (in_features, features), cfg.param_dtype)
    bias = (module.param("bias", nn.initializers.zeros, (features,), cfg.param_dtype)
            if use_bias else None)
    return kernel, bias


class DenseParams(nn.Module):
    """nn.Dense's parameters only, for an op that does its own matmuls (the FP8 MLP)."""

    features: int
    config: MosaicBertConfig
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, Optional[jax.Array]]:
        return _dense_params(self, self.config, in_features, self.features, self.use_bias)


class DenseVariables(nn.Module):
    """DenseBiasApart's variables (same names): kernel, bias and, when it trains in FP8, its
    stats (None without the collection), for an op that does the matmul itself
    (fused/fp8_attention.py)."""

    features: int
    config: MosaicBertConfig

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array, Optional[dict]]:
        kernel, bias = _dense_params(self, self.config, in_features, self.features)
        return kernel, bias, fp8.stats_variables(self, self.config.fp8_amax_history)


class DenseBiasApart(nn.Module):
    """nn.Dense's parameters (same names, shapes, inits) and matmul, returning the bias
    instead of adding it, so the fused LayerNorm kernel adds it without another pass
    (an FP8 matmul when cfg.fp8, as _big_dense). fp8_role ("qkv", "attention_out"): when
    fp8.dense_op_roles(cfg.fp8_gemm) holds it, the matmul is fused/fp8_dense.py's op, its
    stats in this module."""

    features: int
    config: MosaicBertConfig
    fp8_role: str = ""

    @nn.compact
    def __call__(self, x) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        kernel, bias = _dense_params(self, cfg, x.shape[-1], self.features)
        if cfg.fp8 and self.fp8_role in fp8.dense_op_roles(cfg.fp8_gemm):
            stats = fp8.stats_variables(self, cfg.fp8_amax_history)
            if stats is not None:  # training; without the stats, the plain matmul below
                y = fp8_dense.dense(x.reshape(-1, x.shape[-1]).astype(cfg.dtype),
                                    kernel.astype(cfg.dtype), stats,
                                    _fused_impl("glu_implementation", cfg, x.shape[-1]),
                                    cfg.dtype)
                return y.reshape(x.shape[:-1] + (self.features,)), bias
        fp8_dot = fp8.dot_general_cls(cfg.fp8, cfg.fp8_amax_history, cfg.fp8_gemm)
        dot = fp8_dot() if fp8_dot else jax.lax.dot_general
        y = dot(x.astype(cfg.dtype), kernel.astype(cfg.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        return y, bias


def _dense_add_layernorm(cfg: MosaicBertConfig, x, residual, dropout: Optional[Dropout],
                         deterministic: bool, dense_name: str, norm_name: str,
                         copies: int = 1, fp8_role: str = ""):
    """LayerNorm(dropout(Dense(x)) + residual): one fused kernel after the matmul, or the
    plain flax composition. copies = 2 returns the output twice, one per consumer (the
    next matmul, the next residual), so the fused backward adds their cotangents in-kernel.
    fp8_role: the dense layer's, for DenseBiasApart."""
    impl = _fused_impl("layernorm_implementation", cfg, cfg.hidden_size)
    dense = DenseBiasApart(cfg.hidden_size, cfg, fp8_role=fp8_role, name=dense_name)
    if impl == "xla":
        x, x_bias = dense(x)
        x = x + x_bias.astype(cfg.dtype)
        if dropout is not None:
            x = dropout(x, deterministic)
        y = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name=norm_name)(x + residual)
        return y if copies == 1 else (y,) * copies
    x, x_bias = dense(x)
    seed, rate = (dropout.hash_seed(deterministic) if dropout is not None
                  else (jnp.zeros((2,), jnp.uint32), 0.0))
    scale, bias = LayerNormParams(cfg, name=norm_name)()
    return fused.dropout_add_layernorm(x, residual, scale, bias, seed, rate, cfg.layer_norm_eps,
                                       x_bias, implementation=impl, copies=copies)


def _per_consumer(x) -> tuple[jax.Array, jax.Array]:
    """(input of the next matmul, next residual): a layer output given once per consumer,
    or one array used for both."""
    return x if isinstance(x, tuple) else (x, x)


class MosaicBertSelfOutput(nn.Module):
    """Output dense, dropout, residual add, post-LN; the output once per consumer (the MLP's
    matmul and its residual)."""

    config: MosaicBertConfig

    @nn.compact
    def __call__(self, hidden, residual, deterministic: bool):
        cfg = self.config
        dropout = Dropout(cfg.hidden_dropout_prob, cfg.dropout_rng)
        return _dense_add_layernorm(cfg, hidden, residual, dropout, deterministic, "dense",
                                    "LayerNorm", copies=2, fp8_role="attention_out")


class MosaicBertGatedMLP(nn.Module):
    """GLU: one bias-free projection to 2 x intermediate, gelu(first half) * second half.
    Takes its input once per consumer or as one array; returns `copies` outputs."""

    config: MosaicBertConfig
    copies: int = 1

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        x, residual = _per_consumer(x)
        if cfg.fp8 and fp8.kernel_quantized(cfg.fp8_gemm):
            up, down = (fp8.Fp8Stats(cfg.fp8_amax_history, name=name)()
                        for name in ("gated_layers_fp8", "wo_fp8"))
            if up is not None:  # training: FP8; without the stats, the plain MLP below
                return self._fp8_mlp(x, residual, up, down, deterministic)
        h = _big_dense(cfg, 2 * cfg.intermediate_size, "gated_layers", use_bias=False)(x)
        dropout = Dropout(cfg.hidden_dropout_prob, cfg.dropout_rng)
        impl = _fused_impl("glu_implementation", cfg, cfg.intermediate_size)
        if impl == "xla":
            gated, non_gated = h[..., :cfg.intermediate_size], h[..., cfg.intermediate_size:]
            h = (gelu(gated) * non_gated.astype(jnp.float32)).astype(cfg.dtype)
            h = dropout(h, deterministic)
        else:
            seed, rate = dropout.hash_seed(deterministic)
            h = fused.glu_dropout(h, seed, rate, impl)
        return _dense_add_layernorm(cfg, h, residual, None, deterministic, "wo", "layernorm",
                                    copies=self.copies)

    def _fp8_mlp(self, x, residual, up: dict, down: dict, deterministic: bool):
        """fp8_gemm "mlp": the same parameters and computation, both GEMMs in FP8 with the
        GLU kernels quantising the wide tensors (fused/fp8_mlp.py), then the LayerNorm."""
        cfg = self.config
        w_up, _ = DenseParams(2 * cfg.intermediate_size, cfg, use_bias=False,
                              name="gated_layers")(x.shape[-1])
        w_down, b_down = DenseParams(cfg.hidden_size, cfg, name="wo")(cfg.intermediate_size)
        seed, rate = Dropout(cfg.hidden_dropout_prob, cfg.dropout_rng).hash_seed(deterministic)
        y = fp8_mlp.glu_mlp(x.reshape(-1, x.shape[-1]).astype(cfg.dtype),
                            w_up.astype(cfg.dtype), w_down.astype(cfg.dtype), seed, up, down,
                            rate, _fused_impl("glu_implementation", cfg, cfg.intermediate_size),
                            cfg.dtype)
        scale, bias = LayerNormParams(cfg, name="layernorm")()
        return fused.dropout_add_layernorm(
            y.reshape(x.shape[:-1] + (cfg.hidden_size,)), residual, scale, bias,
            jnp.zeros((2,), jnp.uint32), 0.0, cfg.layer_norm_eps, b_down,
            implementation=_fused_impl("layernorm_implementation", cfg, cfg.hidden_size),
            copies=self.copies)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [batch, seq, hidden] at positions [groups, k] -> [groups, k, hidden].

    groups = batch: position p of row b is token p of that row. A one-hot matmul rather
    than a gather: exact (one 1.0 per row), and its backward is a matmul instead of a
    scatter-add, which is slow on GPU in bf16. Fewer groups (batch % groups == 0): group g
    holds rows [g * r, (g + 1) * r) with r = batch / groups, and p is token p % seq of row
    g * r + p // seq, so rows with many masked tokens share slots with rows with few. That
    is a gather, whose backward adds into float32 (a one-hot over r * seq tokens would cost
    r times the matmul).
    """
    batch, seq, hidden = x.shape
    if positions.shape[0] == batch:
        one_hot = jax.nn.one_hot(positions, seq, dtype=x.dtype)
        return jnp.einsum("bks,bsh->bkh", one_hot, x,
                          preferred_element_type=jnp.float32).astype(x.dtype)
    grouped = x.reshape(positions.shape[0], batch // positions.shape[0] * seq, hidden)
    return _gather_rows(grouped, positions, grouped.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_rows(x: jax.Array, positions: jax.Array, shape: tuple) -> jax.Array:
    """x [g, n, h] (of that shape) at positions [g, k] -> [g, k, h]."""
    return jnp.take_along_axis(x, positions[..., None], axis=1)


def _gather_rows_fwd(x, positions, shape):
    return _gather_rows(x, positions, shape), positions


def _gather_rows_bwd(shape, positions, g):
    # Repeated positions (every empty slot holds 0) add up, as the gather's transpose must.
    groups = jnp.arange(shape[0])[:, None]
    dx = jnp.zeros(shape, jnp.float32).at[groups, positions].add(g.astype(jnp.float32))
    return dx.astype(g.dtype), None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def check_position_groups(batch: int, groups: int) -> None:
    """Refuses masked_positions whose row count (groups) does not divide the batch."""
    if groups < 1 or batch % groups:
        raise ValueError(f"masked_positions has {groups} rows, which does not "
                         f"divide the batch of {batch}: give [batch, k] (positions within "
                         "each row) or [groups, k] with batch % groups == 0 (positions "
                         "within each group of batch / groups rows)")


class MosaicBertLayer(nn.Module):
    """One post-LN block. With `positions`, only those rows go through output and MLP.

    x is the layer input as one array or once per consumer (QKV matmul, residual); the
    output is given `output_copies` times (2 between layers, 1 after the last)."""

    config: MosaicBertConfig
    attention_window: int = 0
    output_copies: int = 1

    @nn.compact
    def __call__(self, x, segment_ids, deterministic: bool, positions=None):
        cfg = self.config
        x, residual = _per_consumer(x)
        context = MosaicBertSelfAttention(cfg, window=self.attention_window,
                                          name="attention_self")(x, segment_ids)
        if positions is not None:  # sparse last layer: keys/values need every token, the rest not
            context = gather_positions(context, positions)
            residual = gather_positions(residual, positions)
        x = MosaicBertSelfOutput(cfg, name="attention_output")(context, residual, deterministic)
        return MosaicBertGatedMLP(cfg, copies=self.output_copies, name="mlp")(x, deterministic)


def layer_attention_window(cfg: MosaicBertConfig, layer: int) -> int:
    """The attention window of layer `layer` (0 = full attention): cfg.attention_window, but
    with global_attention_every = n > 0 the layers with layer % n == 0 (layer 0, n, 2n, ...)
    stay global, as ModernBERT does."""
    every = cfg.global_attention_every
    if every and layer % every == 0:
        return 0
    return cfg.attention_window


class MosaicBertEncoder(nn.Module):
    config: MosaicBertConfig

    @nn.compact
    def __call__(self, x, segment_ids, deterministic: bool, last_layer_positions=None):
        cfg = self.config
        layer_cls = MosaicBertLayer
        if cfg.remat:
            layer_cls = nn.remat(MosaicBertLayer, static_argnums=(3,),
                                 policy=jax.checkpoint_policies.nothing_saveable)
        for i in range(cfg.num_hidden_layers):
            is_last = i == cfg.num_hidden_layers - 1
            positions = last_layer_positions if is_last else None
            x = layer_cls(cfg, attention_window=layer_attention_window(cfg, i),
                          output_copies=1 if is_last else 2,
                          name=f"layer_{i}")(x, segment_ids, deterministic, positions)
        return x


class MosaicBertModel(nn.Module):
    """The encoder: embeddings then layers. Returns hidden states [batch, seq, hidden]."""

    config: MosaicBertConfig

    @nn.compact
    def __call__(self, input_ids, segment_ids, token_type_ids=None, deterministic: bool = True,
                 last_layer_positions=None):
        cfg = self.config
        check_inputs(cfg, input_ids, segment_ids, token_type_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = MosaicBertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids,
                                                         deterministic)
        return MosaicBertEncoder(cfg, name="encoder")(x, segment_ids, deterministic,
                                                      last_layer_positions)


class MosaicBertMLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus its own bias."""

    config: MosaicBertConfig

    @nn.compact
    def __call__(self, x, word_embeddings: jax.Array, bias_apart: bool = False):
        """float32 logits; with bias_apart, (logits in the compute dtype without the decoder
        bias, the float32 bias), for a loss that adds it itself (fused/mlm_loss.py)."""
        cfg = self.config
        x = nn.Dense(cfg.hidden_size, kernel_init=_dense_init(cfg), dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, name="transform_dense")(x)
        x = gelu(x).astype(cfg.dtype)
        x = nn.LayerNorm(epsilon=MLM_HEAD_LAYER_NORM_EPS, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, name="transform_LayerNorm")(x)
        # The matmul writes logits in the compute dtype (as PyTorch autocast does) and the
        # upcast fuses into the loss: float32 output here costs 2.5 ms of a 66 ms base step
        # on an H100 for the 30528-wide logits, with the same loss to 4 digits.
        logits = jnp.einsum("...h,vh->...v", x, word_embeddings.astype(cfg.dtype))
        bias = self.param("decoder_bias", nn.initializers.zeros, (cfg.vocab_size,),
                          cfg.param_dtype)
        if bias_apart:
            return logits, bias.astype(jnp.float32)
        return logits.astype(jnp.float32) + bias.astype(jnp.float32)


class MosaicBertForMaskedLM(nn.Module):
    """Encoder + MLM head. With `masked_positions` [batch, k], the last layer's output/MLP and
    the head run only there and logits are [batch, k, vocab]; otherwise [batch, seq, vocab].
    [groups, k] positions index within groups of batch / groups rows (gather_positions), for
    masking whose count varies by row; logits are then [groups, k, vocab]. Logits are float32
    whatever the compute dtype. bias_apart=True returns (logits in the compute dtype, the
    decoder bias) instead, for the train and eval steps' loss (fused/mlm_loss.py)."""

    config: MosaicBertConfig

    @nn.compact
    def __call__(self, input_ids, segment_ids, token_type_ids=None, masked_positions=None,
                 deterministic: bool = True, bias_apart: bool = False):
        if masked_positions is not None:
            if masked_positions.ndim != 2:
                raise ValueError(f"masked_positions must be [batch, k] or [groups, k]; got "
                                 f"shape {masked_positions.shape}")
            check_position_groups(input_ids.shape[0], masked_positions.shape[0])
            masked_positions = masked_positions.astype(jnp.int32)
        bert = MosaicBertModel(self.config, name="bert")
        hidden = bert(input_ids, segment_ids, token_type_ids, deterministic,
                      last_layer_positions=masked_positions)
        embedding = bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
        return MosaicBertMLMHead(self.config, name="cls")(hidden, embedding, bias_apart)


class MosaicBertForSequenceClassification(nn.Module):
    """Encoder + pooler (dense + tanh on the first token) + dropout + classifier."""

    config: MosaicBertConfig

    @nn.compact
    def __call__(self, input_ids, segment_ids, token_type_ids=None, deterministic: bool = True):
        cfg = self.config
        hidden = MosaicBertModel(cfg, name="bert")(input_ids, segment_ids, token_type_ids,
                                                   deterministic)
        pooled = nn.Dense(cfg.hidden_size, kernel_init=_dense_init(cfg), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name="pooler_dense")(hidden[:, 0])
        pooled = jnp.tanh(pooled)
        rate = (cfg.classifier_dropout_prob if cfg.classifier_dropout_prob is not None
                else cfg.hidden_dropout_prob)
        pooled = Dropout(rate, cfg.dropout_rng)(pooled, deterministic)
        logits = nn.Dense(cfg.num_labels, kernel_init=_dense_init(cfg), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, name="classifier")(pooled)
        return logits.astype(jnp.float32)


def count_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
