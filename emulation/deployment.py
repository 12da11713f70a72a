"""A deployment on this machine: a model and its plan, a server config, the server running.

The end-to-end tests, the benchmarks and `make demo` all build their world
from these, so the demo runs what the tests check. Everything is real: the
plan is exported by tflite_export and run by LiteRT, the server is
`python -m server run` (gunicorn) with SQLite and an artifact folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from models.corpus import FederatedCorpus, load_corpus_from_texts
from models.model import TINY, ModelConfig
from contract.model.weights import save_checkpoint
from emulation.server_process import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]


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


# Every emulated phone talks to the server from one address (127.0.0.1), so the per-address limits
# that would stop a flood from one address are raised for these deployments; the per-device limits
# stay the defaults (server.config.RateLimits).
SHARED_ADDRESS_LIMITS = {f"{action}_per_address": [1e9, 3600.0]
                         for action in ("nonce", "register", "checkin", "upload", "artifact")}


def write_server_config(root: Path, population: str = "en", **settings) -> Path:
    """A server.toml with one population; `settings` override the population keys
    (`eligibility` and `update` are tables of their own, `server` holds top-level keys)."""
    pop = {"goal": 1, "min_round_size": 1, "over_selection": 1.0, "min_selected_fraction": 1.0,
           "min_report_fraction": 1.0, "selection_window_s": 30.0, "reporting_window_s": 300.0, "eval_every": 0,
           "publish_every": 0, "server_optimizer": "sgd", "server_lr": 1.0, "client_lr": 0.5,
           "client_epochs": 1, "client_batch_size": 16}
    eligibility = {"min_separation_s": 0.0, "min_free_memory_mb": 0}
    eligibility.update(settings.pop("eligibility", {}))
    update = settings.pop("update", None)
    server = {"rate_limits": SHARED_ADDRESS_LIMITS, **settings.pop("server", {})}
    pop.update(settings)
    lines = ['database = "state/nightjar.db"', 'artifact_dir = "state/artifacts"',
             'state_dir = "state/private"', "tick_interval_s = 0.2"]
    lines += [f"{k} = {_toml(v)}" for k, v in server.items()]
    lines += ["", f"[populations.{population}]"] + [f"{k} = {_toml(v)}" for k, v in pop.items()]
    lines += ["", f"[populations.{population}.eligibility]"]
    lines += [f"{k} = {_toml(v)}" for k, v in eligibility.items()]
    if update is not None:   # contract.update.spec.UpdateSpec fields; default: the server's
        lines += ["", f"[populations.{population}.update]"]
        lines += [f"{k} = {_toml(v)}" for k, v in dict(update).items()]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "server.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def start_server(root: Path, model: Model, population: str = "en", workers: int = 2,
                 threads: int = 4, **settings) -> ServerProcess:
    """Init the population from `model` and start the real server; the caller stops it."""
    config = write_server_config(root, population, **settings)
    init_population(config, model, population)
    return ServerProcess(config, free_port(), root / "server.log", workers, threads).start()


def init_population(config: Path, model: Model, population: str = "en") -> None:
    """`python -m server init`: the population's version 0 is `model`."""
    done = subprocess.run([sys.executable, "-m", "server", "init", "--config", str(config),
                           "--population", population, "--checkpoint", str(model.checkpoint),
                           "--vocab", str(model.vocab), "--plan-dir", str(model.plan_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"server init failed: {done.stderr[-3000:]}")


def simulated_clock(start: float, speed: float) -> dict:
    """Server config keys for a simulated clock starting now at `start`, `speed` × real time."""
    import time

    return {"clock_start": start, "clock_speed": speed, "clock_epoch": time.time()}


def operator_token(config: Path) -> str:
    """The operator token of the server that `config` configures (what `server init` wrote)."""
    from server.config import load_config
    from server.keys import operator_token as token

    cfg = load_config(config)
    return cfg.operator_token or token(cfg.operator_token_path)


def enrollment(config: Path, population: str, now=None):
    """What a phone of `population` enrolls with: the app credential and the development issuer's
    key (device_runtime.enrollment), read from the state `server init` wrote."""
    import time

    from device_runtime.enrollment import Enrollment
    from server.config import load_config

    return Enrollment.from_file(load_config(config).enrollment_path(population), now=now or time.time)
