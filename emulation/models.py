"""A model to deploy, on disk: its checkpoint, vocabulary and training plan (what `server init` registers).

The half of a test deployment that needs TensorFlow (the model is built and
its plan exported by tflite_export); emulation.deployment, the half that
writes configs and runs the server, stays TensorFlow-free. `tiny_corpus` and
`tiny_model` make the synthetic world of the tests and of `make cluster`;
`initial_model` the demo's and the benchmarks' Gboard-size one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from contract.model.weights import save_checkpoint
from models.corpus import FederatedCorpus, load_corpus_from_texts
from models.model import TINY, ModelConfig


def synthetic_play(n_roles: int = 8, speeches: int = 12, seed: int = 0) -> str:
    """A play in the ALL-CAPS format whose roles speak in learnable patterns."""
    rng = np.random.default_rng(seed)
    subjects = ["the king", "my lord", "the queen", "good friend", "the fool"]
    verbs = ["doth speak", "shall come", "is gone", "will stay", "hath said"]
    lines = ["THE SYNTHETIC PLAY", "", "ACT I.", "", "SCENE I. Nowhere.", ""]
    for i in range(speeches * n_roles):
        role = f"ROLE{chr(65 + i % n_roles)}"
        sentence = " ".join(f"{subjects[rng.integers(5)]} {verbs[rng.integers(5)]} to the hall."
                            for _ in range(3))
        lines += [f"{role}.", sentence.capitalize(), ""]
    return "\n".join(lines)


def tiny_corpus(plays: int = 3, free_slots: int = 0) -> FederatedCorpus:
    """Synthetic plays; their words make the vocabulary (tests only), with `free_slots` for discovery."""
    from contract.model.text import Vocabulary

    texts = {f"play{i}": synthetic_play(seed=i) for i in range(plays)}
    vocab = Vocabulary.build(texts.values(), TINY.vocab_size - 4 + free_slots, free_slots) if free_slots else None
    return load_corpus_from_texts(texts, vocab_size=TINY.vocab_size - 4, heldout_fraction=0.25, vocab=vocab)


@dataclasses.dataclass
class Model:
    config: ModelConfig
    checkpoint: Path
    vocab: Path
    plan_dir: Path
    flat: np.ndarray


def tiny_model(root: Path, corpus: FederatedCorpus, batch_size: int = 16) -> Model:
    """The seeded initial TINY model (sized to the corpus' vocabulary) and its training plan."""
    return initial_model(root, corpus, TINY, batch_size)


def initial_model(root: Path, corpus: FederatedCorpus, config: ModelConfig,
                  batch_size: int = 16, flat: np.ndarray | None = None, dropout=None) -> Model:
    """The initial model of `config` (sized to the corpus' vocabulary: `flat`, say pretrained
    weights, or the seeded initial ones), its checkpoint, vocabulary and training plan (with
    `dropout`, a contract.model.dropout.Dropout, if given): what `python -m server init` registers."""
    from models.model import weight_layout
    from models.simulate import initial_weights
    from tflite_export import export_plan

    root.mkdir(parents=True, exist_ok=True)
    config = config.with_vocab(len(corpus.vocab))
    flat = initial_weights(config) if flat is None else flat
    ckpt = save_checkpoint(root / "init.safetensors", weight_layout(config), flat,
                           {"round": 0, "model_config": dataclasses.asdict(config)})
    corpus.vocab.save(root / "vocab.json")
    export_plan(config, flat, corpus.vocab, root / "plan", batch_size=batch_size, dropout=dropout)
    return Model(config, ckpt, root / "vocab.json", root / "plan", flat)
