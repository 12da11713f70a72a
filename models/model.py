"""The Gboard next-word model: a CIFG-LSTM with tied input/output embeddings.

Read top to bottom: the config, the network, the loss and metrics, then the
wrappers that make it a `tff.learning` model. The forward pass is written with
plain TensorFlow ops, unrolled over a fixed sequence length and with the
cross-entropy as `one_hot * log_softmax`, so the very same function converts
to a TFLite training plan that uses built-in ops only (see tflite_export/).

CIFG ("coupled input and forget gate", Hard et al. 2018): an LSTM whose forget
gate is `1 - input gate`, with the cell output projected down to the embedding
size so the output layer can reuse (tie) the input embedding matrix.

Dropout (a training option, contract.model.dropout) multiplies the embedding
output and the projected cell output by keep masks that are *inputs* of the
forward pass, never drawn inside it: a phone draws them from its session's
seed and feeds them to the LiteRT plan, and the simulation feeds TFF the same
ones. Inference takes no masks.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from contract.model.dropout import Dropout
from contract.model.text import NEVER_SUGGEST, PAD_ID
from contract.model.weights import WeightLayout


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 10_004   # 10k words + pad, bos, eos, oov (must equal len(Vocabulary))
    embedding_dim: int = 96    # input embedding = projection size = tied output embedding
    units: int = 670           # CIFG cell size
    seq_len: int = 20          # tokens per training window (fixed: the RNN is unrolled)
    input_gate_bias: float = -1.0  # initial input-gate bias: forget gate starts ≈ 0.73 open
    init_seed: int = 0         # seed of the initial weights (same seed → same model)

    def with_vocab(self, vocab_size: int) -> "ModelConfig":
        return dataclasses.replace(self, vocab_size=vocab_size)


GBOARD = ModelConfig()
# Tiny: for unit tests and end-to-end tests; same code path, ~40k parameters.
TINY = ModelConfig(vocab_size=1_004, embedding_dim=16, units=32, seq_len=20)
CONFIGS = {"gboard": GBOARD, "tiny": TINY}


def weight_layout(config: ModelConfig) -> WeightLayout:
    """Trainable tensors in the order of `CIFGLanguageModel.trainable_weights`."""
    v, e, h = config.vocab_size, config.embedding_dim, config.units
    return WeightLayout([
        ("embedding", (v, e)),              # tied: input lookup and output projection
        ("cifg/kernel", (e, 3 * h)),        # input → [input gate | candidate | output gate]
        ("cifg/recurrent_kernel", (e, 3 * h)),  # projected state → gates
        ("cifg/bias", (3 * h,)),
        ("cifg/projection", (h, e)),        # cell output → embedding space
        ("output_bias", (v,)),
    ])


def parameter_count(config: ModelConfig) -> int:
    return weight_layout(config).size


class CIFGLanguageModel(tf.keras.layers.Layer):
    """token ids [B, T] int32 → next-token logits [B, T, V] float32."""

    def __init__(self, config: ModelConfig, dropout: Dropout | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config, self.dropout = config, dropout

    def build(self, input_shape):
        c = self.config
        v, e, h = c.vocab_size, c.embedding_dim, c.units
        seed = c.init_seed
        glorot = tf.keras.initializers.GlorotUniform
        self.embedding = self.add_weight(
            name="embedding", shape=(v, e),
            initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=seed))
        self.kernel = self.add_weight(name="cifg/kernel", shape=(e, 3 * h),
                                      initializer=glorot(seed=seed + 1))
        self.recurrent_kernel = self.add_weight(
            name="cifg/recurrent_kernel", shape=(e, 3 * h),
            initializer=tf.keras.initializers.Orthogonal(seed=seed + 2))
        bias = [c.input_gate_bias] * h + [0.0] * (2 * h)
        self.bias = self.add_weight(name="cifg/bias", shape=(3 * h,),
                                    initializer=tf.keras.initializers.Constant(bias))
        self.projection = self.add_weight(name="cifg/projection", shape=(h, e),
                                          initializer=glorot(seed=seed + 3))
        self.output_bias = self.add_weight(name="output_bias", shape=(v,),
                                           initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        if self.dropout is None:
            return forward(self.trainable_weights, inputs, self.config)
        tokens, *keep = inputs
        return forward(self.trainable_weights, tokens, self.config, self.dropout, keep)


def forward(weights, tokens: tf.Tensor, config: ModelConfig, dropout: Dropout | None = None,
            keep=()) -> tf.Tensor:
    """The network as a pure function of its weights (in `weight_layout` order).

    tokens: [B, T] int32 → logits [B, T, V]. With `dropout`, `keep` holds one
    0/1 mask [B, T, E] per placement (contract.model.dropout.keep_masks).
    """
    embedding, output_bias = weights[0], weights[-1]
    hidden = hidden_states(weights, tokens, config, dropout, keep)    # [B, T, E]
    return tf.einsum("bte,ve->btv", hidden, embedding) + output_bias  # tied output


def hidden_states(weights, tokens: tf.Tensor, config: ModelConfig, dropout: Dropout | None = None,
                  keep=()) -> tf.Tensor:
    """The CIFG's projected outputs [B, T, E] for tokens [B, T], from zero state.

    The RNN is unrolled in Python over T = config.seq_len steps, which
    TFLite's built-in ops can express. Dropout (Zaremba et al. 2014) scales the
    embedding output and the projected output that leaves the cell by their
    masks; the recurrent state is never dropped.
    """
    embedding, kernel, recurrent_kernel, bias, projection, _ = weights
    h_units, e_dim = config.units, config.embedding_dim
    masks = dict(zip(dropout.placement, keep)) if dropout is not None else {}
    if dropout is not None and len(keep) != len(dropout.placement):
        raise ValueError(f"dropout on {list(dropout.placement)} needs {len(dropout.placement)} masks")
    scale = dropout.scale if dropout is not None else 1.0
    inputs = tf.gather(embedding, tokens)                       # [B, T, E]
    if "embedding" in masks:
        inputs = inputs * (tf.cast(masks["embedding"], tf.float32) * scale)
    batch = tf.shape(tokens)[0]
    state_c = tf.zeros([batch, h_units])                        # [B, H]
    state_h = tf.zeros([batch, e_dim])                          # [B, E] (projected)
    outputs = []
    # unstack (not inputs[:, t]) because its gradient is a TFLite built-in
    # (StridedSliceGrad would need a Flex op in the training plan).
    for x_t in tf.unstack(inputs, num=config.seq_len, axis=1):    # [B, E] each
        z = x_t @ kernel + state_h @ recurrent_kernel + bias       # [B, 3H]
        i, g, o = tf.split(z, 3, axis=-1)
        i = tf.sigmoid(i)
        state_c = (1.0 - i) * state_c + i * tf.tanh(g)          # forget gate = 1 - input gate
        state_h = (tf.sigmoid(o) * tf.tanh(state_c)) @ projection  # [B, E]
        outputs.append(state_h)
    hidden = tf.stack(outputs, axis=1)
    if "projection" in masks:
        hidden = hidden * (tf.cast(masks["projection"], tf.float32) * scale)
    return hidden


def masked_cross_entropy(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy over non-pad targets of the batch (0 if there are none).

    Written as `one_hot * log_softmax` (not the sparse TF op) so that the
    gradient graph converts to TFLite built-ins.
    """
    mask = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)          # [B, T]
    one_hot = tf.one_hot(targets, tf.shape(logits)[-1], dtype=tf.float32)
    nll = -tf.reduce_sum(one_hot * tf.nn.log_softmax(logits), axis=-1)  # [B, T]
    return tf.reduce_sum(nll * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


class MaskedCrossEntropy(tf.keras.losses.Loss):
    """Keras face of `masked_cross_entropy` (already a batch mean: no reduction)."""

    def __init__(self, name: str = "masked_cross_entropy"):
        super().__init__(name=name, reduction=tf.keras.losses.Reduction.NONE)

    def call(self, y_true, y_pred):
        return masked_cross_entropy(tf.cast(y_true, tf.int32), y_pred)


def suggestion_hits(targets: tf.Tensor, logits: tf.Tensor, k: int) -> tf.Tensor:
    """1.0 where the target is among the top-k suggestions (see contract.model.metrics).

    Counts rather than sorts: the target is suggested iff it may be suggested
    and fewer than k suggestible words outrank it (a higher score, or an equal
    score and a lower id — `contract.model.metrics.suggestions`' order). A `top_k`
    over the masked vocabulary gives the same answer but cost a fifth of a
    Gboard-size training step; this costs a few elementwise passes.
    """
    targets = tf.cast(targets, tf.int32)                                    # [..., T]
    vocab = tf.shape(logits)[-1]
    suggestible = 1.0 - tf.reduce_sum(tf.one_hot(list(NEVER_SUGGEST), vocab), axis=0)  # [V]
    score = tf.gather(logits, targets[..., None], batch_dims=targets.shape.rank)  # [..., T, 1]
    outranks = tf.logical_or(logits > score, tf.logical_and(
        tf.equal(logits, score), tf.range(vocab) < targets[..., None]))      # [..., T, V]
    rank = tf.reduce_sum(tf.cast(outranks, tf.float32) * suggestible, axis=-1)
    return tf.cast(rank < k, tf.float32) * tf.gather(suggestible, targets)


class SuggestionRecall(tf.keras.metrics.Mean):
    """top-k recall over non-pad targets, micro-averaged (k=1: top-1 accuracy)."""

    def __init__(self, k: int, name: str | None = None, **kwargs):
        super().__init__(name=name or f"top{k}", **kwargs)
        self.k = k

    def update_state(self, y_true, y_pred, sample_weight=None):
        mask = tf.cast(tf.not_equal(y_true, PAD_ID), tf.float32)
        return super().update_state(suggestion_hits(y_true, y_pred, self.k), sample_weight=mask)

    def get_config(self):
        return {**super().get_config(), "k": self.k}


class TokenCount(tf.keras.metrics.Sum):
    """Number of non-pad targets seen (the denominator of every metric)."""

    def __init__(self, name: str = "tokens", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(tf.reduce_sum(tf.cast(tf.not_equal(y_true, PAD_ID), tf.float32)))


def build_keras_model(config: ModelConfig, dropout: Dropout | None = None) -> tf.keras.Model:
    """Functional Keras model: tokens [B, T] → logits [B, T, V]; with `dropout`, its inputs are
    (tokens, one uint8 keep mask [B, T, E] per placement) — a training model only."""
    tokens = tf.keras.Input(shape=(config.seq_len,), dtype=tf.int32, name="tokens")
    if dropout is None:
        return tf.keras.Model(tokens, CIFGLanguageModel(config, name="cifg_lm")(tokens), name="nightjar_cifg")
    keep = [tf.keras.Input(shape=(config.seq_len, config.embedding_dim), dtype=tf.uint8, name=f"keep_{p}")
            for p in dropout.placement]
    logits = CIFGLanguageModel(config, dropout, name="cifg_lm")((tokens, *keep))
    return tf.keras.Model((tokens, *keep), logits, name="nightjar_cifg")


def keras_metrics() -> list[tf.keras.metrics.Metric]:
    return [SuggestionRecall(1), SuggestionRecall(3), TokenCount()]


def input_spec(config: ModelConfig, dropout: Dropout | None = None) -> tuple:
    """(x, y) of a training batch: x is the tokens, or (tokens, keep masks...) with dropout."""
    spec = tf.TensorSpec([None, config.seq_len], tf.int32)
    if dropout is None:
        return (spec, spec)
    mask = tf.TensorSpec([None, config.seq_len, config.embedding_dim], tf.uint8)
    return ((spec,) + (mask,) * len(dropout.placement), spec)


def tff_model_fn(config: ModelConfig, dropout: Dropout | None = None):
    """A no-argument constructor of the `tff.learning` model, as TFF's builders want."""
    import tensorflow_federated as tff

    def model_fn():
        return tff.learning.models.from_keras_model(
            build_keras_model(config, dropout), loss=MaskedCrossEntropy(),
            input_spec=input_spec(config, dropout), metrics=keras_metrics())

    return model_fn
