"""`python -m models …`: corpus statistics, TFF simulation, baselines, evaluation.

Every command that trains prints a tqdm progress bar and ends with a summary;
every error names the flag or file at fault and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import dataclasses
import json
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _model_config(name: str):
    from models.model import CONFIGS

    return CONFIGS[name]


def _load_corpus(args, model_config):
    from models.corpus import load_corpus

    return load_corpus(data_dir=args.data, vocab_size=model_config.vocab_size - 4,
                       seq_len=model_config.seq_len, seed=args.split_seed)


def cmd_corpus(args) -> None:
    from models.corpus import corpus_stats, format_stats

    t0 = time.monotonic()
    corpus = _load_corpus(args, _model_config(args.config))
    stats = corpus_stats(corpus)
    print(format_stats(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2))
    print(f"(loaded in {time.monotonic() - t0:.1f} s)")


def cmd_simulate(args) -> None:
    from contract.update_spec import UpdateSpec
    from models.simulate import SimulationConfig, run_simulation

    config = _model_config(args.config)
    update = UpdateSpec(bits=args.update_bits, rotation=args.update_rotation,
                        clip_norm=args.update_clip_norm, weighting=args.update_weighting,
                        block_size=args.update_block_size)
    if args.update_max_weight is not None:
        update = dataclasses.replace(update, max_weight=args.update_max_weight)
    else:
        update = update.scaled_to_epochs(args.local_epochs)
    try:
        update.validate("--update")
    except ValueError as e:
        raise _UsageError(str(e).replace("--update.", "--update-").replace("_", "-")) from None
    sim = SimulationConfig(rounds=args.rounds, clients_per_round=args.clients_per_round,
                           local_epochs=args.local_epochs, batch_size=args.batch_size,
                           max_client_examples=args.max_client_examples,
                           client_lr=args.client_lr, client_clip_norm=args.client_clip_norm,
                           server_optimizer=args.server_optimizer,
                           server_lr=args.server_lr,
                           server_lr_warmup_rounds=args.server_lr_warmup_rounds,
                           server_lr_decay_rounds=args.server_lr_decay_rounds,
                           eval_every=args.eval_every,
                           max_eval_windows=args.max_eval_windows, seed=args.seed, update=update)
    initial = _read_checkpoint(args.init, config) if args.init else None
    corpus = _load_corpus(args, config)
    summary = run_simulation(corpus, config, sim, args.out, initial=initial)
    print(_summary_table("federated (TFF simulation)", summary["initial"], summary["final"]))
    print(f"rounds: {sim.rounds}, wall time {summary['wall_s']:.0f} s; upload "
          f"{summary['upload_bytes_per_client'] / 1e6:.3f} MB per client and round ({update.bits}-bit"
          f"{', rotated' if update.rotation else ''}, clip {update.clip_norm:g}, max weight "
          f"{update.max_weight}); metrics, checkpoints and curves.png in {args.out}")


def cmd_central(args) -> None:
    from models.central import train_central
    from models.model import weight_layout
    from contract.weights import save_checkpoint

    config = _model_config(args.config)
    corpus = _load_corpus(args, config)
    heldout = list(corpus.heldout.values())
    import numpy as np

    result = train_central(config, list(corpus.train.values()), np.concatenate(heldout),
                           epochs=args.epochs, batch_size=args.batch_size,
                           learning_rate=args.lr, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus.vocab.save(out / "vocab.json")
    save_checkpoint(out / "central.safetensors", weight_layout(config), result.flat,
                    {"model_config": dataclasses.asdict(config), "history": result.history})
    for row in result.history:
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.3f}, held-out "
              f"top-1 {row['heldout']['top1']:.4f}, top-3 {row['heldout']['top3']:.4f} "
              f"({row['seconds']:.0f} s)")
    print(f"checkpoint: {out / 'central.safetensors'}")


def cmd_ngram(args) -> None:
    from models.ngram import KneserNeyTrigram

    config = _model_config(args.config)
    corpus = _load_corpus(args, config)
    t0 = time.monotonic()
    model = KneserNeyTrigram(len(corpus.vocab)).fit(list(corpus.train.values()))
    hits = model.evaluate(list(corpus.heldout.values())).as_dict()
    print(f"Kneser-Ney trigram on held-out clients: top-1 {hits['top1']:.4f}, "
          f"top-3 {hits['top3']:.4f} over {hits['positions']} positions "
          f"({time.monotonic() - t0:.0f} s)")


def cmd_evaluate(args) -> None:
    from models.central import evaluate

    config = _model_config(args.config)
    flat = _read_checkpoint(args.checkpoint, config)
    corpus = _load_corpus(args, config)
    ev = evaluate(config, flat, list(corpus.heldout.values())).as_dict()
    print(json.dumps(ev, indent=2))


def _read_checkpoint(path: str, config):
    from models.model import weight_layout
    from contract.weights import load_checkpoint

    if not Path(path).is_file():
        raise _UsageError(f"--checkpoint/--init: no file at {path}")
    layout, flat, _ = load_checkpoint(path)
    if layout != weight_layout(config):
        raise _UsageError(f"{path}: its weights do not fit the '{config}' model config")
    return flat


def _summary_table(name: str, initial: dict, final: dict) -> str:
    return (f"\n{name}\n{'':12}{'top-1':>8}{'top-3':>8}{'loss':>8}\n"
            f"{'initial':12}{initial['top1']:8.4f}{initial['top3']:8.4f}{initial['loss']:8.3f}\n"
            f"{'final':12}{final['top1']:8.4f}{final['top3']:8.4f}{final['loss']:8.3f}")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    from contract.hadamard import BLOCK_SIZES
    from contract.update_spec import BITS, WEIGHTINGS, UpdateSpec
    from models.simulate import SERVER_OPTIMIZERS, SimulationConfig

    p = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", choices=["gboard", "tiny"], default="gboard",
                        help="model size (tiny: tests and quick runs)")
    common.add_argument("--data", default=None, help="data directory (default: ./data or $NIGHTJAR_DATA)")
    common.add_argument("--split-seed", type=int, default=0, help="seed of the train/held-out client split")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("corpus", parents=[common], help="fetch the corpus and print its statistics")
    c.add_argument("--json", help="also write the statistics to this JSON file")
    c.set_defaults(func=cmd_corpus)

    d = SimulationConfig()
    s = sub.add_parser("simulate", parents=[common], help="federated training with TFF")
    s.add_argument("--rounds", type=int, default=d.rounds)
    s.add_argument("--clients-per-round", type=int, default=d.clients_per_round)
    s.add_argument("--local-epochs", type=int, default=d.local_epochs)
    s.add_argument("--batch-size", type=int, default=d.batch_size)
    s.add_argument("--max-client-examples", type=int, default=None,
                   help="cap on the windows a client trains on per epoch")
    s.add_argument("--client-lr", type=float, default=d.client_lr)
    s.add_argument("--client-clip-norm", type=float, default=None,
                   help="clip each client step's gradient to this global L2 norm")
    s.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default=d.server_optimizer)
    s.add_argument("--server-lr", type=float, default=d.server_lr)
    s.add_argument("--server-lr-warmup-rounds", type=int, default=d.server_lr_warmup_rounds,
                   help="ramp the server learning rate linearly up over this many rounds")
    s.add_argument("--server-lr-decay-rounds", type=int, default=d.server_lr_decay_rounds,
                   help="ramp it linearly down to ~0 over this many final rounds")
    s.add_argument("--eval-every", type=int, default=d.eval_every)
    s.add_argument("--max-eval-windows", type=int, default=None)
    s.add_argument("--seed", type=int, default=d.seed)
    u = UpdateSpec()
    s.add_argument("--update-bits", type=int, default=u.bits, choices=BITS,
                   help="bits per value of each client's update (32: float32)")
    s.add_argument("--update-rotation", action=argparse.BooleanOptionalAction, default=u.rotation,
                   help="randomized Hadamard rotation before quantizing")
    s.add_argument("--update-clip-norm", type=float, default=u.clip_norm,
                   help="clip each client's update to this L2 norm")
    s.add_argument("--update-weighting", choices=WEIGHTINGS, default=u.weighting)
    s.add_argument("--update-max-weight", type=int, default=None,
                   help=f"cap on a client's weight (default: {u.max_weight} x --local-epochs)")
    s.add_argument("--update-block-size", type=int, default=u.block_size, choices=BLOCK_SIZES)
    s.add_argument("--init", help="start from this checkpoint instead of the seeded initial model")
    s.add_argument("--out", default="runs/simulate", help="output directory")
    s.set_defaults(func=cmd_simulate)

    ce = sub.add_parser("central", parents=[common], help="train the CIFG centrally (baseline)")
    ce.add_argument("--epochs", type=int, default=2)
    ce.add_argument("--batch-size", type=int, default=64)
    ce.add_argument("--lr", type=float, default=2e-3)
    ce.add_argument("--seed", type=int, default=0)
    ce.add_argument("--out", default="runs/central")
    ce.set_defaults(func=cmd_central)

    n = sub.add_parser("ngram", parents=[common], help="Kneser-Ney trigram baseline")
    n.set_defaults(func=cmd_ngram)

    e = sub.add_parser("evaluate", parents=[common], help="score a checkpoint on held-out clients")
    e.add_argument("--checkpoint", required=True)
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    from models.tff_runtime import install_exit_handlers

    install_exit_handlers()
    args = build_parser().parse_args(argv)
    minimum = {name: 1 for name in ("rounds", "clients_per_round", "local_epochs", "batch_size",
                                     "eval_every", "epochs", "max_client_examples",
                                     "max_eval_windows")}
    minimum.update(server_lr_warmup_rounds=0, server_lr_decay_rounds=0)
    for name, least in minimum.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            print(f"error: --{name.replace('_', '-')} must be >= {least}", file=sys.stderr)
            return 2
    try:
        args.func(args)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # CorpusError and friends: a message, not a traceback
        from models.corpus import CorpusError

        if isinstance(e, CorpusError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
