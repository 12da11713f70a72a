"""tflite_export on the tiny config: LiteRT parity with TensorFlow, the app model, no Flex ops."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from models.central import get_flat_weights, set_flat_weights
from models.corpus import load_corpus_from_texts
from contract.model.metrics import suggestions
from models.model import (TINY, build_keras_model, forward, masked_cross_entropy, tff_model_fn,
                          weight_layout)
from contract.model.text import NEVER_SUGGEST, PAD_ID, Vocabulary
from tflite_export.export import export_app_model, export_plan
from tflite_export.modelinfo import constant_buffers, non_builtin_ops, operator_names
from tflite_export.reader import load_app_model, load_plan

LAYOUT = weight_layout(TINY)


def patterned_play(seed: int, speeches: int = 60) -> str:
    """A play whose sentences follow learnable, biased word patterns (a clear top-1 at most places)."""
    rng = np.random.default_rng(seed)
    subjects = ["the king", "my lord", "the queen", "good friend", "the fool", "sweet lady",
                "the duke", "thy father"]
    verbs = ["doth speak", "shall come", "is gone", "will stay", "hath said", "must fly", "can see"]
    objects = ["to the hall", "of the night", "with the sword", "in the garden", "for the crown",
               "upon the hill"]
    lines = ["THE PATTERNED PLAY", "", "ACT I.", "", "SCENE I. Nowhere.", ""]
    for i in range(speeches):
        sentences = []
        for _ in range(3):
            s = rng.integers(len(subjects))
            v = (s + rng.choice(2, p=[0.75, 0.25])) % len(verbs)
            o = (v + rng.choice(2, p=[0.75, 0.25])) % len(objects)
            sentences.append(f"{subjects[s]} {verbs[v]} {objects[o]}.")
        lines += [f"ROLE{chr(65 + i % 6)}.", " ".join(sentences).capitalize(), ""]
    return "\n".join(lines)


def full_vocab(vocab: Vocabulary) -> Vocabulary:
    """The corpus vocabulary filled up to TINY's size (the tiny corpus has few words)."""
    return Vocabulary(vocab.tokens + [f"<unused{i}>" for i in range(TINY.vocab_size - len(vocab))])


@pytest.fixture(scope="module")
def corpus():
    texts = {f"play{i}": patterned_play(i) for i in range(4)}
    return load_corpus_from_texts(texts, vocab_size=TINY.vocab_size - 4, heldout_fraction=0.25)


@pytest.fixture(scope="module")
def heldout(corpus) -> np.ndarray:
    return np.concatenate(list(corpus.heldout.values()))


@pytest.fixture(scope="module")
def trained_flat(corpus) -> np.ndarray:
    """TINY after 300 Keras SGD steps on the patterned training clients."""
    train = np.concatenate(list(corpus.train.values()))
    model = build_keras_model(TINY)
    optimizer = tf.keras.optimizers.SGD(1.0)

    @tf.function
    def step(w):
        with tf.GradientTape() as tape:
            loss = masked_cross_entropy(w[:, 1:], model(w[:, :-1]))
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        return loss

    rng = np.random.default_rng(0)
    for _ in range(300):
        loss = step(train[rng.integers(0, len(train), 32)])
    assert float(loss) < 2.0
    return get_flat_weights(model, TINY)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, corpus, trained_flat):
    out = tmp_path_factory.mktemp("export")
    vocab = full_vocab(corpus.vocab)
    export_plan(TINY, trained_flat, vocab, out, batch_size=16, model_version=7)
    export_app_model(TINY, trained_flat, vocab, out, k=3, model_version=7)
    export_app_model(TINY, trained_flat, vocab, out / "float", k=3, quantize=False)
    return out


def keras_logits(flat: np.ndarray, x: np.ndarray) -> np.ndarray:
    model = build_keras_model(TINY)
    set_flat_weights(model, TINY, flat)
    return model(x).numpy()


def tf_sgd_step(flat: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float):
    """The reference: one w -= lr * grad step in TensorFlow on tf.Variables."""
    variables = [tf.Variable(t) for t in LAYOUT.unflatten(flat.copy()).values()]
    with tf.GradientTape() as tape:
        loss = masked_cross_entropy(tf.constant(y), forward(variables, tf.constant(x), TINY))
    for v, g in zip(variables, tape.gradient(loss, variables)):
        v.assign_sub(lr * tf.convert_to_tensor(g))
    return LAYOUT.flatten([v.numpy() for v in variables]), float(loss)


def test_infer_matches_keras_logits(export_dir, trained_flat, heldout):
    plan = load_plan(export_dir / "plan.manifest.json")
    x = heldout[:37, :-1]          # two full batches of 16 and a padded one
    got = plan.infer(x)
    assert got.shape == (37, TINY.seq_len, TINY.vocab_size)
    diff = np.abs(got - keras_logits(trained_flat, x)).max()
    print(f"\nparity: LiteRT infer vs Keras logits, max abs diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("rows", [16, 5], ids=["full_batch", "padded_short_batch"])
def test_train_step_matches_tensorflow_sgd(export_dir, trained_flat, heldout, rows):
    plan = load_plan(export_dir / "plan.manifest.json")
    np.testing.assert_array_equal(plan.get_weights(), trained_flat)
    batch = heldout[:rows]
    step = plan.train_windows(batch, lr=0.5)
    expected, expected_loss = tf_sgd_step(trained_flat, batch[:, :-1], batch[:, 1:], 0.5)
    got = plan.get_weights()
    diff = np.abs(got - expected).max()
    print(f"\nparity: LiteRT train step vs TensorFlow SGD ({rows} rows), max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert np.abs(got - trained_flat).max() > 1e-3          # the step did move the weights
    assert step.loss == pytest.approx(expected_loss, abs=1e-5)
    assert step.tokens == int(np.sum(batch[:, 1:] != PAD_ID))


def test_clipped_train_step_matches_the_simulations_client_optimizer(tmp_path, trained_flat,
                                                                     corpus, heldout):
    from models.fedavg import build_clipped_sgd

    clip = 0.05
    export_plan(TINY, trained_flat, full_vocab(corpus.vocab), tmp_path, clip_norm=clip)
    plan = load_plan(tmp_path / "plan.manifest.json")
    assert plan.manifest.clip_norm == clip
    batch = heldout[16:21]
    plan.train_windows(batch, lr=0.5)

    variables = [tf.constant(t) for t in LAYOUT.unflatten(trained_flat.copy()).values()]
    with tf.GradientTape() as tape:
        tape.watch(variables)
        loss = masked_cross_entropy(tf.constant(batch[:, 1:]),
                                    forward(variables, tf.constant(batch[:, :-1]), TINY))
    grads = tape.gradient(loss, variables)
    assert float(tf.linalg.global_norm(grads)) > 2 * clip     # the clip really bites
    optimizer = build_clipped_sgd(0.5, clip)
    _, expected = optimizer.next(optimizer.initialize(None), variables, grads)
    expected = LAYOUT.flatten([t.numpy() for t in expected])
    got = plan.get_weights()
    assert np.abs(got - expected).max() <= 1e-6
    assert np.linalg.norm(got - trained_flat) == pytest.approx(0.5 * clip, rel=1e-3)


def test_set_weights_then_get_weights_is_exact_and_used_by_infer(export_dir, heldout):
    plan = load_plan(export_dir / "plan.manifest.json")
    flat = np.random.default_rng(1).normal(0, 0.1, LAYOUT.size).astype(np.float32)
    plan.set_weights(flat)
    np.testing.assert_array_equal(plan.get_weights(), flat)
    x = heldout[:16, :-1]
    assert np.abs(plan.infer(x) - keras_logits(flat, x)).max() <= 1e-4
    with pytest.raises(ValueError, match="flat weights"):
        plan.set_weights(flat[:-1])


def test_flat_layout_round_trips_with_tff_model_weights(export_dir):
    import tensorflow_federated as tff

    model = tff_model_fn(TINY)()       # building the model object starts no TFF worker
    trainable = tff.learning.models.ModelWeights.from_model(model).trainable
    for variable, entry in zip(trainable, LAYOUT.entries):
        assert variable.name.split("/", 1)[1].startswith(entry.name) and variable.shape == entry.shape
    rng = np.random.default_rng(2)
    for variable in trainable:
        variable.assign(rng.normal(size=variable.shape).astype(np.float32))
    tensors = [v.numpy() for v in trainable]
    plan = load_plan(export_dir / "plan.manifest.json")
    plan.set_weights(LAYOUT.flatten(tensors))
    back = LAYOUT.unflatten(plan.get_weights())
    for (name, tensor), original in zip(back.items(), tensors):
        np.testing.assert_array_equal(tensor, original, err_msg=name)


def test_plan_uses_builtin_ops_only(export_dir):
    plan = load_plan(export_dir / "plan.manifest.json")
    model = (export_dir / "plan.tflite").read_bytes()
    assert non_builtin_ops(model) == []
    ops = operator_names(model)
    assert not [op for op in ops if op.startswith("CUSTOM")]
    assert {"ASSIGN_VARIABLE", "READ_VARIABLE", "LOG_SOFTMAX", "ONE_HOT"} <= set(ops)
    assert plan.manifest.ops == ops
    assert plan.manifest.signatures["train"]["inputs"] == {
        "lr": {"shape": [], "dtype": "float32"},
        "x": {"shape": [16, TINY.seq_len], "dtype": "int32"},
        "y": {"shape": [16, TINY.seq_len], "dtype": "int32"}}


def test_float_app_model_gives_the_training_models_suggestions(export_dir, trained_flat, heldout):
    app = load_app_model(export_dir / "float" / "app.manifest.json")
    rows = heldout[:6, :-1]
    probs = tf.nn.softmax(keras_logits(trained_flat, rows)).numpy()
    for row, p in zip(rows, probs):
        for length in (1, 2, 7, TINY.seq_len):
            got = app.suggest(row[:length])
            expected = suggestions(p[length - 1], k=3)
            assert [i for i, _ in got] == expected.tolist()
            np.testing.assert_allclose([q for _, q in got], p[length - 1][expected], atol=1e-5)
    # A longer context keeps its last seq_len tokens (read from zero state, like a training window).
    long_context = np.concatenate([heldout[0, :5], heldout[1, :-1]])
    last = long_context[-TINY.seq_len:]
    expected = suggestions(keras_logits(trained_flat, last[None])[0, -1], k=3)
    assert [i for i, _ in app.suggest(long_context)] == expected.tolist()


def test_quantized_app_model_agrees_with_float_top1(export_dir, trained_flat, heldout):
    app = load_app_model(export_dir / "app.manifest.json")
    assert app.k == 3 and app.manifest.model_version == 7
    logits = keras_logits(trained_flat, heldout[:, :-1])
    agree = positions = 0
    for row, row_logits in zip(heldout, logits):
        for pos in range(TINY.seq_len):
            if row[pos + 1] == PAD_ID:
                break
            got = app.suggest(row[:pos + 1])
            assert len(got) == 3 and not {i for i, _ in got} & set(NEVER_SUGGEST)
            assert got[0][1] >= got[1][1] >= got[2][1] > 0
            agree += got[0][0] == suggestions(row_logits[pos], k=1)[0]
            positions += 1
    assert positions >= 1000
    print(f"\nparity: quantized app model top-1 agrees with float on {agree / positions:.2%} "
          f"of {positions} positions")
    assert agree / positions >= 0.98, f"top-1 agreement {agree / positions:.4f} over {positions}"


def test_app_model_stores_the_tied_embedding_once_in_8_and_4_bits(export_dir):
    model = (export_dir / "app.tflite").read_bytes()
    half = TINY.vocab_size // 2
    kinds = sorted((c["tensors"][0]["dtype"], c["tensors"][0]["shape"][0], c["bytes"]) for c in constant_buffers(model)
                   if c["tensors"][0]["shape"] in ([half, TINY.embedding_dim], [TINY.vocab_size - half, TINY.embedding_dim]))
    assert kinds == [("int4", TINY.vocab_size - half, (TINY.vocab_size - half) * TINY.embedding_dim // 2),
                     ("int8", half, half * TINY.embedding_dim)]


def test_weights_are_rounded_per_channel_and_int4_is_packed_low_nibble_first():
    from tflite_export.compact import dequantize, pack_int4, quantize

    w = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32) * np.arange(1, 6)  # columns differ
    for bits in (8, 4):
        q, scale = quantize(w, bits, axis=1)
        top = 2 ** (bits - 1) - 1
        assert q.dtype == np.int8 and np.abs(q).max() == top and scale.shape == (5,)
        np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / top, rtol=1e-6)
        assert np.all(np.abs(dequantize(q, scale, 1) - w) <= scale / 2 + 1e-6)     # nearest level
    assert pack_int4(np.array([1, -2, 3], np.int8)).tolist() == [0xE1, 0x03]


def test_app_model_runs_the_network_on_exactly_its_stored_weights(export_dir, trained_flat, heldout):
    """The phone's arithmetic is the float network on `rounded` weights: LiteRT's distribution equals
    TensorFlow's on them, at every context length; `suggest` is its top-k."""
    from tflite_export.app_model import phone_weights

    rounded_flat = phone_weights(TINY, trained_flat)
    assert not np.array_equal(rounded_flat, trained_flat)
    app = load_app_model(export_dir / "app.manifest.json")
    expected = tf.nn.softmax(keras_logits(rounded_flat, heldout[:4, :-1])).numpy()
    for row, p in zip(heldout[:4], expected):
        for length in (1, 2, 9, TINY.seq_len):
            got = app.probabilities(row[:length])
            np.testing.assert_allclose(got, p[length - 1], atol=2e-6)
            assert [i for i, _ in app.suggest(row[:length])] == suggestions(got, k=3).tolist()


def test_app_model_bytes_are_its_stored_weights_and_a_small_graph(export_dir):
    """Where the bytes go: each weight once, at its precision, half the embedding's rows in 4 bits, and a
    graph that grows with neither the vocabulary nor the steps; so the Gboard config's budget is its weights'
    bytes plus that graph."""
    from models.model import GBOARD
    from tflite_export.app_model import bytes_by_array

    def stored(config):
        return sum(bytes_by_array(config).values())

    model = (export_dir / "app.tflite").read_bytes()
    graph = len(model) - stored(TINY)
    assert 0 < graph < GRAPH_ALLOWANCE
    by_size = [c["bytes"] for c in constant_buffers(model)]
    half = TINY.vocab_size // 2 * TINY.embedding_dim
    assert by_size[:2] == [half, half // 2]                     # the embedding: 8-bit rows, 4-bit rows
    assert stored(GBOARD) + GRAPH_ALLOWANCE <= 1_400_000


GRAPH_ALLOWANCE = 30_000   # bytes: the graph, signatures and small constants (the zero states)


def test_distribution_and_suggest_share_one_graph(export_dir, heldout):
    from ai_edge_litert import schema_py_generated as schema

    model = (export_dir / "app.tflite").read_bytes()
    root = schema.Model.GetRootAsModel(model, 0)
    graphs = {root.SignatureDefs(i).SignatureKey(): root.SignatureDefs(i).SubgraphIndex()
              for i in range(root.SignatureDefsLength())}
    assert set(graphs) == {b"suggest", b"distribution"} and len(set(graphs.values())) == 1
    assert "WHILE" in operator_names(model) and root.SubgraphsLength() == 3        # main, loop test, loop step
    app = load_app_model(export_dir / "app.manifest.json")
    for row in heldout[:3]:
        p = app.probabilities(row[:5])
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        top = app.suggest(row[:5])
        np.testing.assert_allclose([q for _, q in top], p[[i for i, _ in top]], rtol=1e-6)
