"""Public pretraining: the CIFG trained centrally on public text only, the start of federated training.

Gboard's language models are pretrained on public text before federated
training (Xu et al. 2023), and pretraining is the largest single lever on
federated quality (Nguyen et al. 2022). Here the public text is
models.public_corpus's; the windows are encoded with the caller's
vocabulary (the public one; a users' vocabulary only for the comparison row
of the quality benchmark). No user text goes in.

The result is cached in the data directory under a key of everything it
depends on (model config, vocabulary, public text, training settings), so
`make demo` and the benchmarks pretrain once per machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from contract.model.text import Vocabulary, to_sequences
from contract.model.weights import load_checkpoint, save_checkpoint
from models.corpus import default_data_dir
from models.model import ModelConfig, weight_layout
from models.public_corpus import TEXT_SHA256, load_verses


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 2               # over the ~67k public windows
    batch_size: int = 64
    learning_rate: float = 2e-3   # Adam (models.central.train_central)
    seed: int = 0
    dropout: float = 0.0          # dropout rate at contract.model.dropout's placement (0: none)


def public_windows(vocab: Vocabulary, seq_len: int, data_dir: str | Path | None = None) -> np.ndarray:
    """The public text as training windows under `vocab`: everything pretraining sees."""
    return to_sequences(load_verses(data_dir), vocab, seq_len)


def cache_path(config: ModelConfig, vocab: Vocabulary, cfg: PretrainConfig,
               data_dir: str | Path | None = None) -> Path:
    settings = dataclasses.asdict(cfg)
    if not settings["dropout"]:     # keeps the key (the cache) of a run from before dropout existed
        del settings["dropout"]
    key = json.dumps({"model": dataclasses.asdict(config), "vocab": vocab.sha256, "text": TEXT_SHA256,
                      "pretrain": settings}, sort_keys=True)
    return Path(data_dir or default_data_dir()) / f"pretrained-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def pretrain(config: ModelConfig, vocab: Vocabulary, cfg: PretrainConfig = PretrainConfig(),
             data_dir: str | Path | None = None, eval_windows: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """The pretrained weights and the per-epoch history (cached: module docstring)."""
    path = cache_path(config, vocab, cfg, data_dir)
    if path.is_file():
        layout, flat, meta = load_checkpoint(path)
        if layout == weight_layout(config):
            return flat, meta.get("history", [])
    from contract.model.dropout import parse
    from models.central import train_central

    result = train_central(config, public_windows(vocab, config.seq_len, data_dir), eval_windows,
                           epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                           seed=cfg.seed, dropout=parse(cfg.dropout))
    save_checkpoint(path, weight_layout(config), result.flat,           # atomic: a killed run leaves none
                    {"model_config": dataclasses.asdict(config), "history": result.history,
                     "trained_on": "public", "vocab_sha256": vocab.sha256})
    return result.flat, result.history
