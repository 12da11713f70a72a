"""The keyboard's suggestion model: batch 1, within 1.4 MB, top-k ids and probabilities.

Input: `tokens` int32 [1, seq_len], the context left-aligned (starting with
<bos>) and right-padded, and `length` int32 [], how many of them are real.
Output: `ids` int32 [k] and `probs` float32 [k], the k most probable next
tokens after position length-1, never pad/bos/oov. A second signature,
`distribution`, takes the same inputs and returns the whole next-token
distribution `probs` float32 [V]: what a personal model (its cache, a
personal output bias) mixes in on the phone (device_runtime.personalization).

The network runs the CIFG step in a loop over the `length` real tokens (a
LiteRT WHILE: the graph holds one step, not seq_len of them, and a short
context costs a few steps), from zero state like a training window, so the
answer is the training model's distribution at position length-1. The
output layer (E x V, V = 10k) is applied once, to the last state.

Size (Gboard's app model is 1.4 MB): every weight is stored by
tflite_export.compact in 8 bits and dequantized once on the phone, so
inference runs in float on rounded weights (`phone_weights` gives them) —
except half of the tied embedding's rows, in 4 bits:
* each embedding row is divided by its largest |value| before it is rounded
  (`embedding_scale` multiplies it back), so the rows of rare words, small
  ones, get as many levels as the rest;
* the rows are ordered by the model's own unigram prior softmax(output_bias)
  (`embedding_position` maps a word to its row): the more probable
  `Storage.eight_bit_rows` in 8 bits, the rest — words the model itself
  rarely suggests — in 4 bits.
The embedding is stored once, shared by the input lookup and the output
layer, and `distribution` is an output of `suggest`'s graph.
benchmarks/export.py measures size and top-1 agreement with the float model,
and what each of these choices gives.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from contract.model.text import NEVER_SUGGEST
from models.model import ModelConfig, weight_layout
from tflite_export.compact import Precision, compact, rounded, stored_bytes
from tflite_export.convert import convert

SIGNATURE = "suggest"
DISTRIBUTION = "distribution"

# How each stored array is kept (axis: the array's axis with a scale per index).
APP_PRECISION = {
    "embedding_8bit": Precision(8),                  # [R, E] the more probable words' rows, each divided by its scale
    "embedding_4bit": Precision(4),                  # [V - R, E] the others'
    "embedding_scale": Precision(16),                # [V] each row's largest |value|, in row order
    "cifg/kernel": Precision(8, axis=0),             # [E, 3H]: a scale per input dimension
    "cifg/recurrent_kernel": Precision(8, axis=0),
    "cifg/bias": Precision(16),
    "cifg/projection": Precision(8, axis=1),         # [H, E]: a scale per output dimension
    "output_bias": Precision(8),                     # [V] in row order
}


@dataclasses.dataclass(frozen=True)
class Storage:
    """How the app model stores its weights (`APP_STORAGE`; the others exist to measure each choice)."""

    eight_bit_rows: float = 0.5     # the fraction of embedding rows (the most probable words) kept in 8 bits
    row_scales: bool = True         # divide each embedding row by its largest |value| (else one scale for all)
    precision: dict = dataclasses.field(default_factory=lambda: dict(APP_PRECISION))


APP_STORAGE = Storage()


def _without_never_suggest(scores: tf.Tensor) -> tf.Tensor:
    """Scores [V] with pad/bos/oov replaced by -1 (below any probability), built from slices."""
    pieces, start = [], 0
    for banned in sorted(NEVER_SUGGEST):
        pieces += [scores[start:banned], tf.constant([-1.0])]
        start = banned + 1
    return tf.concat(pieces + [scores[start:]], axis=0)


def _step(kernel, recurrent_kernel, bias, projection, x_t, state_c, state_h):
    """One CIFG step (models.model.hidden_states' loop body): x_t [1, E] → (state_c [1, H], state_h [1, E])."""
    z = x_t @ kernel + state_h @ recurrent_kernel + bias
    i, g, o = tf.split(z, 3, axis=-1)
    i = tf.sigmoid(i)
    state_c = (1.0 - i) * state_c + i * tf.tanh(g)
    return state_c, (tf.sigmoid(o) * tf.tanh(state_c)) @ projection


def app_module(config: ModelConfig, stored: dict[str, np.ndarray], k: int) -> tuple[tf.Module, dict]:
    """The app model as a tf.Module whose constants are the `stored` arrays (`stored_arrays`): one
    signature, `suggest`, with the distribution as a third output (compact makes it a signature)."""
    c = {name: tf.constant(value) for name, value in stored.items()}
    cell = [c[n] for n in ("cifg/kernel", "cifg/recurrent_kernel", "cifg/bias", "cifg/projection")]
    eight = int(stored["embedding_8bit"].shape[0])

    def embed(words):                                   # [n] ids → [n, E]
        row = tf.cast(tf.gather(c["embedding_position"], words), tf.int32)
        x = tf.where(row[:, None] < eight, tf.gather(c["embedding_8bit"], tf.minimum(row, eight - 1)),
                     tf.gather(c["embedding_4bit"], tf.maximum(row - eight, 0)))
        return x * tf.gather(c["embedding_scale"], row)[:, None]

    def distribution(tokens, length):
        inputs = embed(tokens[0])                       # [seq_len, E], looked up once, outside the loop

        def body(t, state_c, state_h):
            return (t + 1, *_step(*cell, tf.gather(inputs, t)[None, :], state_c, state_h))

        start = (tf.constant(0), tf.zeros([1, config.units]), tf.zeros([1, config.embedding_dim]))
        _, _, state = tf.while_loop(lambda t, c_, h: t < length, body, start, maximum_iterations=config.seq_len)
        # transpose_b: an embedding block [rows, E] is already a FULLY_CONNECTED weight [out, in].
        logits = tf.concat([tf.matmul(state, c["embedding_8bit"], transpose_b=True),
                            tf.matmul(state, c["embedding_4bit"], transpose_b=True)], axis=1)[0]
        by_row = tf.nn.softmax(logits * c["embedding_scale"] + c["output_bias"])
        return tf.gather(by_row, c["embedding_position"])             # [V] in word order

    inputs = [tf.TensorSpec([1, config.seq_len], tf.int32, "tokens"), tf.TensorSpec([], tf.int32, "length")]

    @tf.function(input_signature=inputs)
    def suggest(tokens, length):
        p = distribution(tokens, length)
        probs, ids = tf.math.top_k(_without_never_suggest(p), k=k)
        return {"ids": ids, "probs": probs, DISTRIBUTION: p}

    return tf.Module(name="nightjar_app"), {SIGNATURE: suggest.get_concrete_function()}


def stored_arrays(config: ModelConfig, flat: np.ndarray, storage: Storage = APP_STORAGE
                  ) -> dict[str, np.ndarray]:
    """The arrays the app model holds for weights `flat`: the embedding's rows ordered by the unigram
    prior and divided by their scales, split at `storage.eight_bit_rows`; the other weights as they are
    (output_bias in row order). The network computes the same function as `flat`."""
    w = weight_layout(config).unflatten(np.asarray(flat, np.float32))
    order = np.argsort(-w["output_bias"], kind="stable")         # softmax(output_bias) is monotone in it
    position = np.empty(len(order), np.int16 if len(order) < 2 ** 15 else np.int32)
    position[order] = np.arange(len(order))
    rows = w["embedding"][order]
    scale = np.abs(rows).max(axis=1) if storage.row_scales else np.full(len(rows), np.abs(rows).max())
    scale = rounded(np.where(scale > 0, scale, 1.0).astype(np.float32),
                    storage.precision.get("embedding_scale", Precision(32)))
    rows = rows / scale[:, None]
    eight = int(round(storage.eight_bit_rows * len(rows)))
    return {**{n: v for n, v in w.items() if n != "embedding"}, "output_bias": w["output_bias"][order],
            "embedding_8bit": rows[:eight], "embedding_4bit": rows[eight:], "embedding_scale": scale,
            "embedding_position": position}


def bytes_by_array(config: ModelConfig, storage: Storage = APP_STORAGE) -> dict[str, int]:
    """Bytes of each stored array's data and scales (compact.stored_bytes), the graph not included."""
    v, e = config.vocab_size, config.embedding_dim
    eight = int(round(storage.eight_bit_rows * v))
    shapes = {"embedding_8bit": (eight, e), "embedding_4bit": (v - eight, e), "embedding_scale": (v,),
              **{x.name: x.shape for x in weight_layout(config).entries if x.name != "embedding"}}
    out = {name: stored_bytes(shape, storage.precision.get(name, Precision(32))) for name, shape in shapes.items()}
    out["embedding_position"] = v * (2 if v < 2 ** 15 else 4)
    return out


def phone_weights(config: ModelConfig, flat: np.ndarray, storage: Storage = APP_STORAGE) -> np.ndarray:
    """The float weights [layout.size] the app model's inference computes with: `flat` as stored and
    dequantized, in the layout's order."""
    stored = stored_arrays(config, flat, storage)
    r = {n: rounded(v, storage.precision[n]) for n, v in stored.items() if n != "embedding_position"}
    row = stored["embedding_position"].astype(np.int64)
    rows = np.concatenate([r["embedding_8bit"], r["embedding_4bit"]]) * r["embedding_scale"][:, None]
    r.update(embedding=rows[row], output_bias=r["output_bias"][row])
    return np.concatenate([r[e.name].reshape(-1) for e in weight_layout(config).entries]).astype(np.float32)


def convert_app_model(config: ModelConfig, flat: np.ndarray, k: int = 3,
                      quantize: bool = True) -> bytes:
    """The app model as .tflite bytes; quantize=False keeps every array in float32 (for parity checks)."""
    if not 1 <= k <= config.vocab_size - len(NEVER_SUGGEST):
        raise ValueError(f"k must be between 1 and {config.vocab_size - len(NEVER_SUGGEST)}")
    stored = stored_arrays(config, flat, APP_STORAGE if quantize else Storage(precision={}))
    module, concrete = app_module(config, stored, k)
    return compact(convert(module, concrete, what="app model"), stored, APP_STORAGE.precision if quantize else {},
                   extra_signature=(SIGNATURE, DISTRIBUTION, DISTRIBUTION, "probs"))
