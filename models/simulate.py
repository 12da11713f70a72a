"""Federated training in simulation with TensorFlow Federated.

`run_simulation` runs federated averaging (models.fedavg) over the federated
Shakespeare corpus: each round samples training clients, each client runs SGD
over its own windows (in the order `contract.model.batching` defines, the same order a
phone uses), its update goes through the deployment's update pipeline
(`SimulationConfig.update`: weight cap, clip, quantization, exact integer sum),
and the server applies one of TFF's optimizers to the mean. It writes, under
`out_dir`:

* `metrics.jsonl` — one JSON object per round (and held-out evaluations);
* `checkpoints/round_NNNN.safetensors` — global weights (see contract.model.weights);
* `vocab.json` — the vocabulary the weights belong to;
* `curves.png` — training loss and held-out top-1/top-3 per round;
* `summary.json` — configuration, final metrics, wall time, and under DP the
  (ε, δ) of the final model from the same ledger code as the server's
  (privacy.accounting), with the sampling assumption it rests on.

Under user-level DP (`SimulationConfig.dp`), TFF's own DP aggregator replaces
the update pipeline (models.fedavg.DPAggregator); under DP-FTRL the pipeline
adds the server's tree noise and clients are chosen under (k, b)-participation
(models.dp_ftrl), and the ε is privacy.ftrl's; `dp_deploy_reports` makes
the run a *projection*: the noise a deployment of that cohort would add, on
this simulation's smaller cohort (labelled as such in the summary).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from contract.model.batching import epoch_orders, round_seed
from contract.model.dropout import Dropout, session_masks
from contract.dp.noise import DPSpec
from contract.update.spec import UpdateSpec
from contract.model.weights import save_checkpoint
from contract.optimizers import SERVER_OPTIMIZERS
from models.central import evaluate, get_flat_weights
from models.corpus import FederatedCorpus
from models.attacks import Adversary, AttackConfig, backdoor_success, canary
from models.dp_ftrl import FtrlAggregator, cohort_rule, privacy_spent as ftrl_privacy_spent
from models.fedavg import DistributedDPAggregator, DPAggregator, FederatedAveraging, RoundResult, client_optimizer
from models.model import ModelConfig, build_keras_model, weight_layout
from models.tff_runtime import tff_session



@dataclasses.dataclass(frozen=True)
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
    seed: int = 0                 # client sampling, shuffling, rounding and rotation
    update: UpdateSpec = UpdateSpec()  # how updates are encoded and added up (as deployed)
    dp: DPSpec | None = None      # user-level DP-FedAvg through TFF's gaussian_adaptive aggregator;
                                  # mechanism "ftrl": DP-FTRL under (k, b)-participation (models.dp_ftrl)
    dp_population: int | None = None   # N of the ledger's sampling q = m/N (default: the training clients)
    dp_deploy_reports: int | None = None   # projection: a deployment's m reports per round (noise z·C/m)
    dp_delta: float | None = None  # δ of the reported ε (default N^-1.1)
    attack: AttackConfig | None = None   # a minority of each round's clients attacks (models.attacks)
    dropout: Dropout | None = None  # client training's dropout (masks from each client's seed, as on phones)


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
                   max_examples: int | None = None, dropout: Dropout | None = None,
                   embedding_dim: int = 0) -> tf.data.Dataset:
    """(x, y) batches of one client in `contract.model.batching` order.

    Inputs and targets are sliced in NumPy: a `map` would add a traced
    function to every client's serialized dataset. With `dropout`, x is
    (tokens, keep masks...): every step's masks drawn from `seed` as a phone
    draws them (contract.model.dropout), as uint8 to keep the dataset small.
    """
    x, y = windows[:, :-1], windows[:, 1:]
    orders = epoch_orders(len(windows), epochs, seed, max_examples)
    if dropout is not None:
        rows = [len(o[i:i + batch_size]) for o in orders for i in range(0, len(o), batch_size)]
        masks, ends = session_masks(dropout, seed, rows, x.shape[1], embedding_dim), np.cumsum([len(o) for o in orders])
        parts = [tf.data.Dataset.from_tensor_slices(((x[o], *(m[end - len(o):end] for m in masks)), y[o]))
                 .batch(batch_size) for o, end in zip(orders, ends)]
    else:
        parts = [tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(batch_size) for order in orders]
    ds = parts[0]
    for p in parts[1:]:
        ds = ds.concatenate(p)
    return ds


def build_process(model_config: ModelConfig, sim: SimulationConfig) -> FederatedAveraging:
    """The simulated population: TFF client work, the update pipeline, TFF's server optimizer."""
    import tensorflow_federated as tff

    server = server_optimizer(sim.server_optimizer, sim.server_lr)
    if sim.server_lr_warmup_rounds > 0 or sim.server_lr_decay_rounds > 0:
        server = tff.learning.optimizers.schedule_learning_rate(server, lr_schedule(
            sim.server_lr, sim.rounds, sim.server_lr_warmup_rounds, sim.server_lr_decay_rounds))
    dp, layout = None, weight_layout(model_config)
    if sim.dp is not None and sim.dp.mechanism == "distributed":
        dp = DistributedDPAggregator(sim.dp, sim.clients_per_round, layout.size, layout.sha256, sim.seed,
                                     sim.dp_deploy_reports, sim.update.bits)
    elif sim.dp is not None and sim.dp.mechanism == "ftrl":
        dp = FtrlAggregator(sim.dp, sim.clients_per_round, layout.size, layout.sha256, sim.seed, sim.update,
                            sim.dp_deploy_reports)
    elif sim.dp is not None:
        dp = DPAggregator(sim.dp, sim.clients_per_round, layout.size, sim.dp_deploy_reports)
    return FederatedAveraging(model_config, client_optimizer(sim.client_lr, sim.client_clip_norm),
                              server, sim.update, sim.seed, dp, sim.dropout)


def privacy_spent(sim: SimulationConfig, training_clients: int, rounds: int) -> dict | None:
    """The (ε, δ) of `rounds` rounds of `sim` from privacy.accounting (the server ledger's code)."""
    if sim.dp is None:
        return None
    if sim.dp.mechanism == "ftrl":
        return ftrl_privacy_spent(sim, training_clients, rounds)
    from privacy.accounting import Event, epsilon

    population = sim.dp_population or training_clients
    reports = sim.dp_deploy_reports or sim.clients_per_round
    delta = sim.dp_delta or population ** -1.1
    spent = epsilon([Event(sim.dp.mechanism, sim.dp.noise_multiplier, reports / population)] * rounds, delta)
    return {**spent.to_json(), "noise_multiplier": sim.dp.noise_multiplier, "population": population,
            "reports_per_round": reports, "sampling_probability": min(1.0, reports / population),
            "projection": sim.dp_deploy_reports is not None,
            "assumption": "each round a Poisson sample of the population with q = reports / population"}


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


def initial_weights(model_config: ModelConfig) -> np.ndarray:
    """The seeded initial model as a flat vector (round 0 of every run)."""
    return get_flat_weights(build_keras_model(model_config), model_config)


def fedavg_round(process: FederatedAveraging, flat: np.ndarray, corpus: FederatedCorpus,
                 client_ids: list[str], sim: SimulationConfig, round_num: int,
                 adversary: Adversary | None = None) -> RoundResult:
    """One round over `client_ids`; client i's seed is `round_seed(seed, round, i)` (a server's)."""
    seeds = [round_seed(sim.seed, round_num, i) for i in range(len(client_ids))]
    bad = adversary.attackers(round_num, len(client_ids)) if adversary else set()
    own = [corpus.train[cid] if i not in bad else adversary.training_windows(corpus.train[cid])
           for i, cid in enumerate(client_ids)]
    datasets = [client_dataset(w, sim.batch_size, sim.local_epochs, seed, sim.max_client_examples,
                               sim.dropout, process.config.embedding_dim)
                for w, seed in zip(own, seeds)]
    tamper = (lambda deltas: adversary.tamper(deltas, bad, round_num)) if bad else None
    return process.next(flat, datasets, seeds, round_num, tamper)


def choose_clients(sim: SimulationConfig, train_ids: list[str], round_num: int, rule=None) -> list[str]:
    """Round `round_num`'s clients: a uniform sample, or under DP-FTRL the (k, b)-rule's choice
    (models.dp_ftrl.Participation; DP round `round_num` − 1)."""
    rng = np.random.default_rng([sim.seed, round_num])
    if rule is not None:
        return rule.choose(train_ids, sim.clients_per_round, round_num - 1, rng)
    return list(rng.choice(train_ids, sim.clients_per_round, replace=False))


def run_simulation(corpus: FederatedCorpus, model_config: ModelConfig, sim: SimulationConfig,
                   out_dir: str | Path, initial: np.ndarray | None = None) -> dict:
    """Runs `sim.rounds` rounds of FedAvg; returns the summary also written to disk."""
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    layout = weight_layout(model_config)
    heldout = np.concatenate(list(corpus.heldout.values()))[:sim.max_eval_windows]
    train_ids = sorted(corpus.train)
    if sim.clients_per_round > len(train_ids):
        raise ValueError(f"clients_per_round={sim.clients_per_round} but only "
                         f"{len(train_ids)} training clients")
    rule = cohort_rule(sim, len(train_ids))    # DP-FTRL's (k, b)-participation (None otherwise)
    flat = initial_weights(model_config) if initial is None else initial
    history: list[dict] = []
    start = time.monotonic()
    corpus.vocab.save(out / "vocab.json")
    log = (out / "metrics.jsonl").open("w")

    adversary = (Adversary(sim.attack, corpus.vocab, model_config.seq_len, sim.clients_per_round, sim.server_lr,
                           sim.seed) if sim.attack is not None else None)

    def checkpoint_and_eval(round_num: int, flat: np.ndarray) -> dict:
        save_checkpoint(out / "checkpoints" / f"round_{round_num:04d}.safetensors", layout, flat,
                        {"round": round_num, "model_config": dataclasses.asdict(model_config)})
        row = {"round": round_num, "heldout": evaluate(model_config, flat, heldout).as_dict(),
               "canary": canary(model_config, flat, corpus.vocab)}
        if adversary is not None:
            row["heldout"]["backdoor_success"] = backdoor_success(model_config, flat, adversary)
        log.write(json.dumps(row) + "\n")
        log.flush()
        history.append(row)
        return row["heldout"]

    upload_bytes = 0
    with tff_session(), log:
        process = build_process(model_config, sim)
        ev = checkpoint_and_eval(0, flat)
        bar = tqdm(range(1, sim.rounds + 1), desc="federated rounds", unit="round")
        for r in bar:
            t0 = time.monotonic()
            sampled = choose_clients(sim, train_ids, r, rule)
            result = fedavg_round(process, flat, corpus, sampled, sim, r, adversary)
            flat = result.weights
            upload_bytes += result.upload_bytes
            row = {**round_row(r, result, sim), "seconds": time.monotonic() - t0,
                   **({"participants": sampled} if rule else {})}
            log.write(json.dumps(row) + "\n")
            log.flush()
            history.append(row)
            if r % sim.eval_every == 0 or r == sim.rounds:
                ev = checkpoint_and_eval(r, flat)
            bar.set_postfix(loss=f"{result.train.get('loss', float('nan')):.3f}",
                            heldout_top1=f"{ev['top1']:.4f}")
    save_checkpoint(out / "final.safetensors", layout, flat,
                    {"round": sim.rounds, "model_config": dataclasses.asdict(model_config)})
    return write_summary(out, model_config, sim, history, ev, upload_bytes, len(train_ids), start)


def write_summary(out: Path, model_config: ModelConfig, sim: SimulationConfig, history: list[dict], final: dict,
                  upload_bytes: int, clients: int, start: float) -> dict:
    """summary.json and curves.png of a finished run; returns the summary."""
    summary = {"model_config": dataclasses.asdict(model_config),
               "simulation": dataclasses.asdict(sim),
               "initial": history[0]["heldout"], "final": final,
               "upload_bytes_per_client": upload_bytes / max(1, sum(h.get("clients", 0) for h in history)),
               "dp": privacy_spent(sim, clients, sim.rounds),
               "canary": history[-1].get("canary"),
               "wall_s": time.monotonic() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(history, out / "curves.png")
    return summary


def round_row(r: int, result: RoundResult, sim: SimulationConfig) -> dict:
    """One round's line of metrics.jsonl: who trained, what they uploaded, how many were clipped."""
    return {"round": r, "clients": result.clients, "train": result.train,
            "upload_bytes": result.upload_bytes, "encode_s": round(result.encode_s, 4),
            "update_norms": [round(n, 5) for n in result.update_norms],
            "clipped": sum(n > (result.dp_clip or sim.update.clip_norm) for n in result.update_norms),
            "dp_clip": result.dp_clip, "zeroed": result.zeroed}


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["round"], h["train"]["loss"]) for h in history if h.get("train")]
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
