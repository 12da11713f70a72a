"""The keyboard's suggestion model: batch 1, int8 weights, top-k ids and probabilities.

Input: `tokens` int32 [1, seq_len], the context left-aligned (starting with
<bos>) and right-padded, and `length` int32 [], how many of them are real.
Output: `ids` int32 [k] and `probs` float32 [k], the k most probable next
tokens after position length-1, never pad/bos/oov. A second signature,
`distribution`, takes the same inputs and returns the whole next-token
distribution `probs` float32 [V]: what a personal model (its cache, a
personal output bias) mixes in on the phone (device_runtime.personalization). The RNN is causal and the
training model starts every window from zero state, so the padding after the
context cannot change the answer: it is exactly the training model's
distribution at that position.

The output layer is the costly part (E x V per position, V = 10k). Only one
position is needed, so the network runs `models.model.hidden_states` and the
tied output layer is applied once, at position length-1. Weights are quantized to int8 (dynamic range: activations stay
float, no calibration data); the tied embedding is stored once, shared by the
input lookup and the output layer.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from models.model import ModelConfig, hidden_states, weight_layout
from contract.model.text import NEVER_SUGGEST
from tflite_export.convert import convert

SIGNATURE = "suggest"
DISTRIBUTION = "distribution"


def _without_never_suggest(scores: tf.Tensor) -> tf.Tensor:
    """Scores [V] with pad/bos/oov replaced by -1 (below any probability), built from slices."""
    pieces, start = [], 0
    for banned in sorted(NEVER_SUGGEST):
        pieces += [scores[start:banned], tf.constant([-1.0])]
        start = banned + 1
    return tf.concat(pieces + [scores[start:]], axis=0)


def app_module(config: ModelConfig, flat: np.ndarray, k: int) -> tuple[tf.Module, dict]:
    """The app model as a tf.Module (weights as constants, so they can be quantized)."""
    weights = [tf.constant(t) for t in
               weight_layout(config).unflatten(np.asarray(flat, np.float32)).values()]
    embedding, output_bias = weights[0], weights[-1]

    inputs = [tf.TensorSpec([1, config.seq_len], tf.int32, "tokens"), tf.TensorSpec([], tf.int32, "length")]

    def next_logits(tokens, length):
        state = tf.gather(hidden_states(weights, tokens, config)[0], length - 1)   # [E]
        # transpose_b: the embedding [V, E] is already a FULLY_CONNECTED weight [out, in].
        return tf.matmul(state[None, :], embedding, transpose_b=True)[0] + output_bias

    @tf.function(input_signature=inputs)
    def suggest(tokens, length):
        probs, ids = tf.math.top_k(_without_never_suggest(tf.nn.softmax(next_logits(tokens, length))), k=k)
        return {"ids": ids, "probs": probs}

    @tf.function(input_signature=inputs)
    def distribution(tokens, length):
        return {"probs": tf.nn.softmax(next_logits(tokens, length))}

    return tf.Module(name="nightjar_app"), {SIGNATURE: suggest.get_concrete_function(),
                                            DISTRIBUTION: distribution.get_concrete_function()}


def convert_app_model(config: ModelConfig, flat: np.ndarray, k: int = 3,
                      quantize: bool = True) -> bytes:
    """The app model as .tflite bytes; quantize=False keeps float weights (for parity checks)."""
    if not 1 <= k <= config.vocab_size - len(NEVER_SUGGEST):
        raise ValueError(f"k must be between 1 and {config.vocab_size - len(NEVER_SUGGEST)}")
    module, concrete = app_module(config, flat, k)
    return convert(module, concrete, what="app model", quantize=quantize)
