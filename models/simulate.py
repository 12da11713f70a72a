"""Federated training in simulation with TensorFlow Federated.

`run_simulation` drives TFF's `build_weighted_fed_avg` over the federated
Shakespeare corpus: each round samples training clients, each client runs SGD
over its own windows (in the order `contract.batching` defines, the same order a
phone uses), and the server applies one of TFF's optimizers to the weighted
average of the client deltas. It writes, under `out_dir`:

* `metrics.jsonl` — one JSON object per round (and held-out evaluations);
* `checkpoints/round_NNNN.safetensors` — global weights (see contract.weights);
* `vocab.json` — the vocabulary the weights belong to;
* `curves.png` — training loss and held-out top-1/top-3 per round;
* `summary.json` — configuration, final metrics, wall time.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from contract.batching import epoch_orders, round_seed
from models.central import evaluate, get_flat_weights
from models.corpus import FederatedCorpus
from models.model import ModelConfig, build_keras_model, tff_model_fn, weight_layout
from models.tff_runtime import tff_session
from contract.weights import save_checkpoint

SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam", "yogi")


@dataclasses.dataclass
class SimulationConfig:
    rounds: int = 10              # federated rounds to run
    clients_per_round: int = 10   # training clients sampled (without replacement) per round
    local_epochs: int = 1         # passes over its own data each client makes per round
    batch_size: int = 16          # client SGD batch size (sequences)
    max_client_examples: int | None = None  # cap on windows a client trains on per epoch
    client_lr: float = 0.5        # client SGD learning rate
    client_clip_norm: float | None = None  # clip each client step's gradient to this global L2 norm
    server_optimizer: str = "adam"  # one of SERVER_OPTIMIZERS (TFF's own implementations)
    server_lr: float = 0.01       # server optimizer learning rate
    server_lr_warmup_rounds: int = 0  # ramp the server lr linearly up over the first k rounds
    server_lr_decay_rounds: int = 0   # ramp it linearly down to ~0 over the last k rounds
    eval_every: int = 5           # held-out evaluation (and checkpoint) every k rounds
    max_eval_windows: int | None = None  # cap on held-out windows evaluated (None: all)
    seed: int = 0                 # client sampling and shuffling


def server_optimizer(name: str, learning_rate: float):
    """TFF's optimizer for the server step; momentum 0.9 for sgdm (as Gboard used)."""
    import tensorflow_federated as tff

    opts = tff.learning.optimizers
    builders = {
        "sgd": lambda: opts.build_sgdm(learning_rate=learning_rate),
        "sgdm": lambda: opts.build_sgdm(learning_rate=learning_rate, momentum=0.9),
        "adam": lambda: opts.build_adam(learning_rate=learning_rate),
        "yogi": lambda: opts.build_yogi(learning_rate=learning_rate),
    }
    if name not in builders:
        raise ValueError(f"unknown server optimizer {name!r}; choose from {SERVER_OPTIMIZERS}")
    return builders[name]()


def client_dataset(windows: np.ndarray, batch_size: int, epochs: int, seed: int,
                   max_examples: int | None = None) -> tf.data.Dataset:
    """(x, y) batches of one client in `contract.batching` order.

    Inputs and targets are sliced in NumPy: a `map` would add a traced
    function to every client's serialized dataset.
    """
    x, y = windows[:, :-1], windows[:, 1:]
    parts = [tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(batch_size)
             for order in epoch_orders(len(windows), epochs, seed, max_examples)]
    ds = parts[0]
    for p in parts[1:]:
        ds = ds.concatenate(p)
    return ds


def build_process(model_config: ModelConfig, sim: SimulationConfig):
    import tensorflow_federated as tff

    if sim.client_clip_norm is None:
        client_optimizer = tff.learning.optimizers.build_sgdm(learning_rate=sim.client_lr)
    else:
        client_optimizer = build_clipped_sgd(sim.client_lr, sim.client_clip_norm)
    server = server_optimizer(sim.server_optimizer, sim.server_lr)
    if sim.server_lr_warmup_rounds > 0 or sim.server_lr_decay_rounds > 0:
        server = tff.learning.optimizers.schedule_learning_rate(server, lr_schedule(
            sim.server_lr, sim.rounds, sim.server_lr_warmup_rounds, sim.server_lr_decay_rounds))
    # TFF's default loop (DATASET_REDUCE) runs each client's training as a
    # tf.data reduce: the C++ runtime pays ~0.2 s per client to set it up, and
    # the step runs slower inside it. Iterating the dataset instead halves
    # a Gboard-size round (4.9 s against 9.7 s for 10 clients × 6 batches,
    # benchmarks/TUNING.md) and computes the same update up to float rounding.
    return tff.learning.algorithms.build_weighted_fed_avg(
        tff_model_fn(model_config), client_optimizer_fn=client_optimizer,
        server_optimizer_fn=server,
        loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)


def lr_schedule(learning_rate: float, rounds: int, warmup: int, decay: int):
    """round index i (from 0) → lr · min(1, (i+1)/warmup) · min(1, (rounds-i)/decay).

    A ramp up, then constant, then a linear ramp down to ~0 at the last round.
    The decay is what `make bench-quality` uses: it averages out the noise of
    client sampling that a high constant server rate leaves in the final
    model. The warmup is for experiments; with FedAdam at 0.03 it moved the
    early loss spike to where the rate peaked rather than removing it
    (benchmarks/TUNING.md).
    """
    def schedule(round_index):
        i = tf.cast(round_index, tf.float32)
        up = (i + 1.0) / float(max(warmup, 1))
        down = (float(rounds) - i) / float(max(decay, 1))
        return learning_rate * tf.clip_by_value(tf.minimum(up, down), 0.0, 1.0)

    return schedule


def build_clipped_sgd(learning_rate: float, clip_norm: float):
    """A `tff.learning` optimizer: w -= lr * clip_by_global_norm(g, clip_norm).

    Plain SGD on a client that trains dozens of local steps on one speaker's
    text can blow up; bounding each step's norm keeps a high learning rate
    usable. The training plan applies the same `tf.clip_by_global_norm`.
    """
    import collections

    import tensorflow_federated as tff

    class ClippedSGD(tff.learning.optimizers.Optimizer):
        def initialize(self, specs):
            return collections.OrderedDict(learning_rate=learning_rate)

        def next(self, state, weights, gradients):
            clipped, _ = tf.clip_by_global_norm(tf.nest.flatten(gradients), clip_norm)
            updated = [w - tf.cast(state["learning_rate"], w.dtype) * g
                       for w, g in zip(tf.nest.flatten(weights), clipped)]
            return state, tf.nest.pack_sequence_as(weights, updated)

        def get_hparams(self, state):
            return collections.OrderedDict(learning_rate=state["learning_rate"])

        def set_hparams(self, state, hparams):
            return collections.OrderedDict(learning_rate=hparams["learning_rate"])

    return ClippedSGD()


def initial_weights(model_config: ModelConfig) -> np.ndarray:
    """The seeded initial model as a flat vector (round 0 of every run)."""
    return get_flat_weights(build_keras_model(model_config), model_config)


def fedavg_round(process, state, corpus: FederatedCorpus, client_ids: list[str],
                 sim: SimulationConfig, round_num: int):
    """One `process.next` over `client_ids`; returns (state, train metrics)."""
    datasets = [client_dataset(corpus.train[cid], sim.batch_size, sim.local_epochs,
                               round_seed(sim.seed, round_num, i), sim.max_client_examples)
                for i, cid in enumerate(client_ids)]
    result = process.next(state, datasets)
    train = result.metrics["client_work"]["train"]
    return result.state, {k: float(v) for k, v in train.items()}


def set_global_weights(process, state, model_config: ModelConfig, flat: np.ndarray):
    import tensorflow_federated as tff

    tensors = list(weight_layout(model_config).unflatten(np.asarray(flat, np.float32)).values())
    return process.set_model_weights(state, tff.learning.models.ModelWeights(tensors, []))


def global_weights(process, state, model_config: ModelConfig) -> np.ndarray:
    return weight_layout(model_config).flatten(list(process.get_model_weights(state).trainable))


def run_simulation(corpus: FederatedCorpus, model_config: ModelConfig, sim: SimulationConfig,
                   out_dir: str | Path, initial: np.ndarray | None = None) -> dict:
    """Runs `sim.rounds` rounds of FedAvg; returns the summary also written to disk."""
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    layout = weight_layout(model_config)
    heldout = np.concatenate(list(corpus.heldout.values()))
    if sim.max_eval_windows is not None:
        heldout = heldout[:sim.max_eval_windows]
    train_ids = sorted(corpus.train)
    if sim.clients_per_round > len(train_ids):
        raise ValueError(f"clients_per_round={sim.clients_per_round} but only "
                         f"{len(train_ids)} training clients")
    flat = initial_weights(model_config) if initial is None else initial
    history: list[dict] = []
    start = time.monotonic()
    corpus.vocab.save(out / "vocab.json")
    log = (out / "metrics.jsonl").open("w")

    def checkpoint_and_eval(round_num: int, flat: np.ndarray) -> dict:
        save_checkpoint(out / "checkpoints" / f"round_{round_num:04d}.safetensors", layout, flat,
                        {"round": round_num, "model_config": dataclasses.asdict(model_config)})
        row = {"round": round_num, "heldout": evaluate(model_config, flat, heldout).as_dict()}
        log.write(json.dumps(row) + "\n")
        log.flush()
        history.append(row)
        return row["heldout"]

    with tff_session(), log:
        process = build_process(model_config, sim)
        state = set_global_weights(process, process.initialize(), model_config, flat)
        ev = checkpoint_and_eval(0, flat)
        bar = tqdm(range(1, sim.rounds + 1), desc="federated rounds", unit="round")
        for r in bar:
            t0 = time.monotonic()
            sampled = list(np.random.default_rng([sim.seed, r]).choice(
                train_ids, sim.clients_per_round, replace=False))
            state, train = fedavg_round(process, state, corpus, sampled, sim, r)
            row = {"round": r, "clients": len(sampled), "train": train,
                   "seconds": time.monotonic() - t0}
            log.write(json.dumps(row) + "\n")
            log.flush()
            history.append(row)
            if r % sim.eval_every == 0 or r == sim.rounds:
                flat = global_weights(process, state, model_config)
                ev = checkpoint_and_eval(r, flat)
            bar.set_postfix(loss=f"{train['loss']:.3f}", heldout_top1=f"{ev['top1']:.4f}")
        flat = global_weights(process, state, model_config)
    save_checkpoint(out / "final.safetensors", layout, flat,
                    {"round": sim.rounds, "model_config": dataclasses.asdict(model_config)})
    summary = {"model_config": dataclasses.asdict(model_config),
               "simulation": dataclasses.asdict(sim),
               "initial": history[0]["heldout"], "final": ev,
               "wall_s": time.monotonic() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(history, out / "curves.png")
    return summary


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["round"], h["train"]["loss"]) for h in history if "train" in h]
    ev = [(h["round"], h["heldout"]) for h in history if "heldout" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot(*zip(*train), label="client training loss")
    ax1.plot([r for r, _ in ev], [e["loss"] for _, e in ev], "o-", label="held-out loss")
    ax1.set_xlabel("round"); ax1.set_ylabel("cross-entropy"); ax1.legend()
    ax2.plot([r for r, _ in ev], [e["top1"] for _, e in ev], "o-", label="top-1 accuracy")
    ax2.plot([r for r, _ in ev], [e["top3"] for _, e in ev], "o-", label="top-3 recall")
    ax2.set_xlabel("round"); ax2.set_ylabel("held-out clients"); ax2.legend()
    fig.suptitle("Nightjar federated training (TFF simulation)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
