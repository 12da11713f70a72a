"""The on-device training plan: train / infer / get_weights / set_weights (and personalization) in one .tflite.

A phone has LiteRT and nothing else, so one SGD step of the model must be a
graph of TFLite built-ins. `models.model` already makes that possible (RNN
unrolled over a fixed length, cross-entropy as one_hot * log_softmax); here the
weights become resource variables initialised from the checkpoint, the batch
size is fixed (a short last batch is padded with all-pad rows, which the
masked loss ignores), and the step is plain SGD, w -= lr * grad, exactly the
client update of TFF's FedAvg with `build_sgdm(learning_rate=lr)` — or, when
the plan is exported with a clip norm, w -= lr * clip_by_global_norm(grad),
the update of `models.fedavg.build_clipped_sgd`.

Exported with dropout (contract.model.dropout), `train` takes one more
input per placement, `keep_<placement>` float32 [batch, seq_len, E]: the 0/1
masks the phone draws from its session's seed (the plan has no random ops).
Nothing else takes masks: `personalize`, `infer` and `next_probs` run the
network whole.

Personalization (contract.tasks.personal) uses two more signatures: `personalize`,
the same SGD step on only the layers the plan was exported to personalize
(`personal_layers`; the step of every layer when none are named), and
`next_probs`, the next-word distribution after one context (batch 1, as the
app model computes it, but float and from the plan's current weights), which
serves a phone's suggestions from its personal weights.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from contract.model.dropout import Dropout
from models.model import ModelConfig, forward, hidden_states, masked_cross_entropy, weight_layout
from contract.model.text import PAD_ID
from tflite_export.convert import convert

SIGNATURES = ("train", "personalize", "infer", "next_probs", "get_weights", "set_weights")


def check_personal_layers(names: list[str], personal_layers: tuple[str, ...] | None) -> None:
    """personal_layers (None: every weight) must name some of the plan's weights and nothing else."""
    unknown = sorted(set(personal_layers or ()) - set(names))
    if unknown or personal_layers == ():
        raise ValueError(f"personal_layers must name some of {', '.join(names)}; got {unknown or 'none'}")


def plan_module(config: ModelConfig, flat: np.ndarray, batch_size: int, clip_norm: float | None = None,
                personal_layers: tuple[str, ...] | None = None,
                dropout: Dropout | None = None) -> tuple[tf.Module, dict[str, object]]:
    """The plan as a tf.Module holding the weights, and its concrete signatures."""
    layout = weight_layout(config)
    names = [e.name for e in layout.entries]
    check_personal_layers(names, personal_layers)
    module = tf.Module(name="nightjar_plan")
    module.weights = [tf.Variable(tensor, name=name.replace("/", "_"))
                      for name, tensor in layout.unflatten(np.asarray(flat, np.float32)).items()]
    tokens = tf.TensorSpec([batch_size, config.seq_len], tf.int32)
    step_specs = [tf.TensorSpec.from_spec(tokens, "x"), tf.TensorSpec.from_spec(tokens, "y"),
                  tf.TensorSpec([], tf.float32, "lr")]

    masks = [tf.TensorSpec([batch_size, config.seq_len, config.embedding_dim], tf.float32, f"keep_{p}")
             for p in (dropout.placement if dropout is not None else ())]

    def sgd_step(x, y, lr, trained: list[int], keep=()):
        with tf.GradientTape() as tape:
            loss = masked_cross_entropy(y, forward(module.weights, x, config, dropout if keep else None, keep))
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, [module.weights[i] for i in trained])]
        if clip_norm is not None:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        for i, grad in zip(trained, grads):
            module.weights[i].assign_sub(lr * grad)
        targets = tf.reduce_sum(tf.cast(tf.not_equal(y, PAD_ID), tf.int32))
        return {"loss": loss, "tokens": targets}

    everything = list(range(len(names)))
    personal = [i for i, n in enumerate(names) if n in personal_layers] if personal_layers else everything

    @tf.function(input_signature=step_specs + masks)
    def train(x, y, lr, *keep):
        return sgd_step(x, y, lr, everything, keep)

    @tf.function(input_signature=step_specs)
    def personalize(x, y, lr):
        return sgd_step(x, y, lr, personal)

    @tf.function(input_signature=[tf.TensorSpec([1, config.seq_len], tf.int32, "tokens"),
                                  tf.TensorSpec([], tf.int32, "length")])
    def next_probs(tokens, length):
        state = tf.gather(hidden_states(module.weights, tokens, config)[0], length - 1)      # [E]
        logits = tf.matmul(state[None, :], module.weights[0], transpose_b=True)[0] + module.weights[-1]
        return {"probs": tf.nn.softmax(logits)}

    @tf.function(input_signature=[tf.TensorSpec.from_spec(tokens, "x")])
    def infer(x):
        return {"logits": forward(module.weights, x, config)}

    get_weights, set_weights = weight_signatures(module, layout)

    concrete = dict(train=train.get_concrete_function(),
                    personalize=personalize.get_concrete_function(),
                    infer=infer.get_concrete_function(),
                    next_probs=next_probs.get_concrete_function(),
                    get_weights=get_weights.get_concrete_function(),
                    set_weights=set_weights.get_concrete_function())
    return module, concrete


def weight_signatures(module: tf.Module, layout) -> tuple:
    """`get_weights` and `set_weights`: the plan's weights as one flat float32 vector, out and in."""
    @tf.function(input_signature=[])
    def get_weights():
        return {"flat": tf.concat([tf.reshape(w, [-1]) for w in module.weights], axis=0)}

    @tf.function(input_signature=[tf.TensorSpec([layout.size], tf.float32, "flat")])
    def set_weights(flat):
        parts = tf.split(flat, [e.size for e in layout.entries])
        assigns = [w.assign(tf.reshape(p, e.shape))
                   for w, p, e in zip(module.weights, parts, layout.entries)]
        # A signature without outputs is pruned to nothing by the converter.
        with tf.control_dependencies(assigns):
            return {"count": tf.size(flat)}

    return get_weights, set_weights


def convert_plan(config: ModelConfig, flat: np.ndarray, batch_size: int = 16,
                 clip_norm: float | None = None, personal_layers: tuple[str, ...] | None = None,
                 dropout: Dropout | None = None) -> bytes:
    """The training plan as .tflite bytes (built-in ops only, float32 weights)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError("clip_norm must be > 0 (or None: no clipping)")
    if dropout is not None:
        dropout.validate()
    module, concrete = plan_module(config, flat, batch_size, clip_norm, personal_layers, dropout)
    return convert(module, concrete, what="training plan", resource_variables=True)
