"""The rows of `make bench-quality` for the model we ship: dropout, and the predictor a keyboard runs.

* `central_dropout`: the CIFG trained centrally on the training users' pooled
  text with dropout (users' vocabulary, like the `central` row): the
  reference the federated network is measured against;
* `federated_pretrained_dropout`: public pretraining with dropout, then
  federated training with dropout (masks from each client's seed, as phones
  draw them) under the public vocabulary + discovered words, with the
  shipped server optimizer. Its final weights are the shipped model
  (runs/shipped/final.safetensors, with vocab.json);
* `shipped_predictor`: that model's app model (the quantized file phones
  run) mixed with what the phone learns as its user types (models.shipped),
  the mixture's weights chosen on training users' text, scored per position
  on the held-out users'.

Each returns its row: top1, top3, loss where defined, rounds, wall time is
added by the caller, and the configuration it ran with.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).resolve().parents[1] / "runs" / "shipped"   # the model we ship (final.safetensors, vocab.json)
# the predictor's grid (models.shipped.grid): the cache's weight λ and smoothing κ, the n-gram's weight μ
CACHE_WEIGHTS, SMOOTHINGS, NGRAM_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3), (0.5, 1.0, 2.0), (0.0, 0.15, 0.3)


def central_dropout(cfg, model_config, users, heldout: np.ndarray) -> dict:
    from contract.model.dropout import parse
    from models.central import train_central

    result = train_central(model_config, list(users.train.values()), heldout, epochs=cfg.central_dropout_epochs,
                           batch_size=cfg.central_batch_size, learning_rate=cfg.central_lr, seed=cfg.seed,
                           dropout=parse(cfg.dropout))
    final = result.history[-1]["heldout"]
    return {**final, "epochs": cfg.central_dropout_epochs,
            "by_epoch": [{"epoch": h["epoch"], "train_loss": h["train_loss"], "top1": h["heldout"]["top1"],
                          "loss": h["heldout"]["loss"]} for h in result.history],
            "config": {"optimizer": "adam", "learning_rate": cfg.central_lr, "batch_size": cfg.central_batch_size,
                       "epochs": cfg.central_dropout_epochs, "dropout": cfg.dropout, "vocabulary": "users"}}


def pretrain_config(cfg):
    from models.pretrain import PretrainConfig

    return PretrainConfig(epochs=cfg.pretrain_epochs, dropout=cfg.dropout)


def federated_dropout(cfg, model_config, corpus, initial: np.ndarray, work_dir: Path, pretrained: dict) -> dict:
    """Federated with dropout from `initial` (pretrained with dropout, discovered words' rows filled);
    publishes the final weights to runs/shipped/."""
    from models.simulate import run_simulation

    run_dir = work_dir / "federated_pretrained_dropout"
    summary = run_simulation(corpus, model_config, cfg.simulation(), run_dir, initial=initial)
    SHIPPED.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "final.safetensors", SHIPPED / "final.safetensors")
    shutil.copy(run_dir / "vocab.json", SHIPPED / "vocab.json")
    return {**summary["final"], "rounds": cfg.rounds,
            "config": {**cfg.federated(), "pretraining": {**dataclasses.asdict(pretrain_config(cfg)), **pretrained},
                       "vocabulary": "public + discovered words", "checkpoint": "runs/shipped/final.safetensors"}}


def shipped_predictor(cfg, model_config, corpus, work_dir: Path) -> dict:
    """The shipped model's app model + typing cache (+ the thresholded n-gram if it earns its place on
    the training users), chosen on `cfg.predictor_tuning_users` training users, scored on every
    held-out user (models.shipped.select_and_score)."""
    from contract.model.weights import load_checkpoint
    from models.shipped import Selection, app_model_probs, select_and_score
    from tflite_export import export_app_model
    from tflite_export.reader import load_app_model

    path = SHIPPED / "final.safetensors"
    if not path.is_file():
        raise SystemExit(f"error: shipped_predictor needs {path}: run the federated_pretrained_dropout row first")
    _, flat, meta = load_checkpoint(path)
    app = load_app_model(export_app_model(model_config, flat, corpus.vocab, work_dir / "shipped_app"))
    sel = Selection(cfg.predictor_tuning_users, cfg.seed, CACHE_WEIGHTS, SMOOTHINGS, NGRAM_WEIGHTS,
                    cfg.predictor_ngram_min_devices)
    out = select_and_score(app_model_probs(app), corpus.train, corpus.heldout, len(corpus.vocab), sel)
    best = out["spec"]
    parts = ["app model"] + (["typing cache"] if best.cache_weight else []) + (
        [f"n-gram of trigrams typed by >= {out['ngram']['min_devices']} users"] if out["ngram"] else [])
    return {**{k: v for k, v in out["hits"].as_dict().items() if k != "positions"}, "rounds": meta.get("round"),
            "app_model_alone": out["model_alone"].as_dict(), "combines": " + ".join(parts),
            "config": {**dataclasses.asdict(best), "chosen_on": f"{len(out['tuning_users'])} training users' text "
                       f"({out['tuning_windows']} windows), never the held-out users",
                       "app_model_bytes": (app.source.parent / app.manifest.artifact).stat().st_size,
                       "ngram": out["ngram"], "grid": dataclasses.asdict(sel)},
            "selection": out["selection"]}
