"""The flat weight layout and safetensors checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

from contract.model.batching import client_batches, epoch_orders, pad_batch, round_seed
from models.model import TINY, build_keras_model, weight_layout
from contract.model.weights import LayoutError, WeightLayout, load_checkpoint, save_checkpoint


def test_flatten_unflatten_round_trip_with_keras_weights():
    layout = weight_layout(TINY)
    tensors = [w.numpy() for w in build_keras_model(TINY).trainable_weights]
    flat = layout.flatten(tensors)
    assert flat.dtype == np.float32 and flat.shape == (layout.size,)
    back = layout.unflatten(flat)
    for (name, t), entry, orig in zip(back.items(), layout.entries, tensors):
        assert name == entry.name
        np.testing.assert_array_equal(t, orig)
    assert layout.to_json()[1]["offset"] == TINY.vocab_size * TINY.embedding_dim


def test_layout_rejects_wrong_shapes_names_and_dtypes():
    layout = WeightLayout([("a", (2, 3)), ("b", (4,))])
    with pytest.raises(LayoutError, match="a: shape"):
        layout.flatten([np.zeros((3, 2)), np.zeros(4)])
    with pytest.raises(LayoutError, match="missing"):
        layout.flatten({"a": np.zeros((2, 3))})
    with pytest.raises(LayoutError, match="flat vector has shape"):
        layout.unflatten(np.zeros(9, np.float32))
    with pytest.raises(LayoutError, match="dtype"):
        layout.unflatten(np.zeros(10, np.float64))
    assert WeightLayout.from_json(layout.to_json()) == layout


def test_checkpoint_round_trip(tmp_path):
    layout = weight_layout(TINY)
    flat = np.random.default_rng(0).normal(size=layout.size).astype(np.float32)
    path = save_checkpoint(tmp_path / "c.safetensors", layout, flat, {"round": 3})
    got_layout, got, meta = load_checkpoint(path)
    assert got_layout == layout and meta == {"round": 3}
    np.testing.assert_array_equal(got, flat)
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(LayoutError, match="not a Nightjar checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")


def test_client_batches_visit_every_window_once_per_epoch_in_seeded_order():
    windows = np.arange(10 * 3, dtype=np.int32).reshape(10, 3)
    batches = client_batches(windows, batch_size=4, epochs=2, seed=7)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]   # short batch kept, no straddling
    for epoch in (batches[:3], batches[3:]):
        assert sorted(np.concatenate(epoch)[:, 0].tolist()) == list(range(0, 30, 3))
    again = client_batches(windows, batch_size=4, epochs=2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not np.array_equal(epoch_orders(10, 1, 7)[0], epoch_orders(10, 1, 8)[0])
    assert round_seed(0, 1, 2) != round_seed(0, 2, 1)


def test_pad_batch_appends_all_pad_rows():
    b = np.ones((3, 4), np.int32)
    padded = pad_batch(b, 5)
    assert padded.shape == (5, 4) and padded[3:].sum() == 0 and padded[:3].sum() == 12
    with pytest.raises(ValueError):
        pad_batch(b, 2)
