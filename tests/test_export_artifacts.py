"""Manifests, the device-side reader's errors, the TF-free import, and the CLI."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from models.model import TINY, build_keras_model, weight_layout
from contract.model.text import SPECIAL_TOKENS, Vocabulary
from contract.model.weights import save_checkpoint
from tflite_export.__main__ import main
from contract.artifacts.errors import (ArtifactError, HashMismatch, MissingArtifact, SchemaMismatch,
                                VocabularyMismatch)
from tflite_export.errors import UnsupportedOpError
from contract.artifacts.manifest import SCHEMA_VERSION, read_manifest
from tflite_export.reader import load_app_model, load_plan

REPO = Path(__file__).resolve().parents[1]


def tiny_vocab(tag: str = "w") -> Vocabulary:
    return Vocabulary(list(SPECIAL_TOKENS) + [f"{tag}{i}" for i in range(TINY.vocab_size - 4)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A simulation-like run: checkpoints/round_0004.safetensors and vocab.json beside them."""
    run = tmp_path_factory.mktemp("run")
    layout = weight_layout(TINY)
    flat = layout.flatten([w.numpy() for w in build_keras_model(TINY).trainable_weights])
    save_checkpoint(run / "checkpoints" / "round_0004.safetensors", layout, flat,
                    {"round": 4, "model_config": dataclasses.asdict(TINY)})
    save_checkpoint(run / "bare.safetensors", layout, flat, {})
    tiny_vocab().save(run / "vocab.json")
    return run


@pytest.fixture(scope="module")
def cli_export(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_out")
    ckpt = str(run_dir / "checkpoints" / "round_0004.safetensors")
    assert main(["plan", "--checkpoint", ckpt, "--out", str(out)]) == 0
    assert main(["app", "--checkpoint", ckpt, "--k", "5", "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy_of(cli_export, tmp_path) -> Path:
    return Path(shutil.copytree(cli_export, tmp_path / "copy"))


def test_cli_export_writes_verified_artifacts_with_a_full_manifest(cli_export):
    assert sorted(p.name for p in cli_export.iterdir()) == [
        "app.manifest.json", "app.tflite", "plan.manifest.json", "plan.tflite", "vocab.json"]
    m = read_manifest(cli_export / "plan.manifest.json")
    assert (m.schema_version, m.kind, m.model_version, m.batch_size) == (SCHEMA_VERSION,
                                                                        "training_plan", 4, 16)
    assert m.model_config == dataclasses.asdict(TINY) and m.seq_len == TINY.seq_len
    assert m.layout == weight_layout(TINY) and m.vocab_sha256 == tiny_vocab().sha256
    assert set(m.files) == {"plan.tflite", "vocab.json"}
    assert m.files["plan.tflite"]["bytes"] == (cli_export / "plan.tflite").stat().st_size
    assert set(m.signatures) == {"train", "personalize", "infer", "next_probs", "get_weights", "set_weights"}
    assert m.created_at.endswith("Z")
    app = load_app_model(cli_export / "app.manifest.json", expected_vocab_sha256=tiny_vocab().sha256)
    assert app.k == 5 and len(app.suggest([1])) == 5
    assert app.manifest.signatures["suggest"]["outputs"]["ids"] == {"shape": [5], "dtype": "int32"}


def test_missing_files_are_named(copy_of):
    with pytest.raises(MissingArtifact, match="nowhere.manifest.json"):
        load_plan(copy_of / "nowhere.manifest.json")
    (copy_of / "plan.tflite").unlink()
    with pytest.raises(MissingArtifact, match=r"plan\.tflite") as err:
        load_plan(copy_of / "plan.manifest.json")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ArtifactError)


def test_hash_mismatch_names_file_expected_and_actual(copy_of):
    data = bytearray((copy_of / "app.tflite").read_bytes())
    data[-1] ^= 0xFF
    (copy_of / "app.tflite").write_bytes(bytes(data))
    expected = read_manifest(copy_of / "app.manifest.json").files["app.tflite"]["sha256"]
    with pytest.raises(HashMismatch) as err:
        load_app_model(copy_of / "app.manifest.json")
    assert "app.tflite" in str(err.value) and expected in str(err.value)
    assert err.value.actual in str(err.value) and err.value.actual != expected


def test_other_schema_versions_kinds_and_broken_manifests_are_refused(copy_of):
    path = copy_of / "plan.manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(SchemaMismatch, match="schema version 2"):
        load_plan(path)
    with pytest.raises(SchemaMismatch, match="not a training_plan"):
        load_plan(copy_of / "app.manifest.json")
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "weight_layout"}))
    with pytest.raises(SchemaMismatch, match="weight_layout"):
        load_plan(path)
    path.write_text("{not json")
    with pytest.raises(SchemaMismatch, match="not a JSON manifest"):
        load_plan(path)


def test_vocabulary_mismatches_are_refused(copy_of):
    with pytest.raises(VocabularyMismatch, match="not the expected"):
        load_plan(copy_of / "plan.manifest.json", expected_vocab_sha256=tiny_vocab("x").sha256)
    # Another vocabulary whose file hash was (wrongly) re-recorded: the vocabulary hash still differs.
    other = tiny_vocab("x")
    other.save(copy_of / "vocab.json")
    path = copy_of / "app.manifest.json"
    data = json.loads(path.read_text())
    data["files"]["vocab.json"] = {"sha256": other.sha256, "bytes": 0}
    path.write_text(json.dumps(data))
    with pytest.raises(VocabularyMismatch, match="vocab.json"):
        load_app_model(path)


def test_reader_runs_without_tensorflow(cli_export):
    script = textwrap.dedent(f"""
        import sys, numpy as np
        import tflite_export, tflite_export.reader as r
        p = r.load_plan({str(cli_export / "plan.manifest.json")!r})
        x = np.ones((3, {TINY.seq_len}), np.int32)
        loss = p.train(x, x, 0.1)
        w = p.get_weights()
        p.set_weights(w)
        assert p.infer(x).shape == (3, {TINY.seq_len}, {TINY.vocab_size})
        a = r.load_app_model({str(cli_export / "app.manifest.json")!r})
        s = a.suggest([1, 5])
        assert len(s) == 5 and loss > 0 and w.dtype == np.float32
        assert 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if 'tensorflow' in m)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_reader_rejects_bad_inputs(cli_export):
    plan = load_plan(cli_export / "plan.manifest.json")
    with pytest.raises(ValueError, match="expected"):
        plan.train(np.ones((17, TINY.seq_len), np.int32), np.ones((17, TINY.seq_len), np.int32), 0.1)
    with pytest.raises(ValueError, match="token ids"):
        plan.infer(np.full((2, TINY.seq_len), TINY.vocab_size))
    app = load_app_model(cli_export / "app.manifest.json")
    with pytest.raises(ValueError, match="at least one token"):
        app.suggest([])


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--checkpoint", "{run}/missing.safetensors", "--out", "{tmp}/o"], "missing.safetensors"),
    (["plan", "--checkpoint", "{run}/bare.safetensors", "--out", "{tmp}/o"], "--config"),
    (["app", "--checkpoint", "{run}/bare.safetensors", "--config", "gboard", "--out", "{tmp}/o"],
     "does not fit"),
    (["plan", "--checkpoint", "{run}/checkpoints/round_0004.safetensors", "--vocab",
      "{tmp}/none.json", "--out", "{tmp}/o"], "none.json"),
    (["plan", "--checkpoint", "{run}/checkpoints/round_0004.safetensors", "--batch-size", "0",
      "--out", "{tmp}/o"], "--batch-size"),
    (["app", "--checkpoint", "{run}/checkpoints/round_0004.safetensors", "--out",
      "{run}/vocab.json"], "--out"),
    (["verify", "{tmp}/absent.manifest.json"], "absent.manifest.json"),
    (["inspect", "{run}/vocab.json"], "vocab.json"),
])
def test_cli_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys, argv, needle):
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_the_output_directory_as_it_was(run_dir, cli_export, copy_of,
                                                             monkeypatch, capsys):
    before = {p.name: p.read_bytes() for p in copy_of.iterdir()}

    def flex(*args, **kwargs):
        raise UnsupportedOpError(["FlexStridedSliceGrad"], "training plan")

    monkeypatch.setattr("tflite_export.plan.convert_plan", flex)
    ckpt = str(run_dir / "checkpoints" / "round_0004.safetensors")
    assert main(["plan", "--checkpoint", ckpt, "--model-version", "9", "--out", str(copy_of)]) == 1
    assert "FlexStridedSliceGrad" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr("contract.artifacts.manifest.Manifest.to_json", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["app", "--checkpoint", ckpt, "--model-version", "9", "--out", str(copy_of)])
    assert {p.name: p.read_bytes() for p in copy_of.iterdir()} == before


def test_inspect_and_verify(cli_export, capsys):
    assert main(["inspect", str(cli_export / "plan.manifest.json")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["non_builtin_ops"] == [] and "train" in info["signatures"]
    assert info["largest_constants"][0]["tensors"][0]["shape"] == [TINY.vocab_size,
                                                                   TINY.embedding_dim]
    assert main(["verify", str(cli_export / "app.manifest.json")]) == 0
    assert capsys.readouterr().out.startswith("ok: app_model v4")
