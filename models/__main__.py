"""`python -m models …`: corpus statistics, pretraining, TFF simulation, discovery, baselines, evaluation.

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

from contract.cli import ArgumentParser, UsageError, run  # noqa: E402
from models.cli_common import (add_dropout_flags, common_flags, dropout_from, load_corpus_for,  # noqa: E402
                               model_config, read_checkpoint, summary_table)
from models.simulate_cli import add_simulate_commands  # noqa: E402


def cmd_corpus(args) -> None:
    from models.corpus import corpus_stats, format_stats
    from models.public_corpus import load_verses, stats as public_stats

    t0 = time.monotonic()
    config = model_config(args.config)
    corpus = load_corpus_for(args, config)
    stats = corpus_stats(corpus)
    stats["vocabulary"] = args.vocabulary
    stats["public"] = public_stats(load_verses(args.data))
    other = "users" if args.vocabulary == "public" else "public"
    stats["oov_rate"] = {args.vocabulary: stats["heldout"]["oov_rate"],
                         other: corpus_stats(load_corpus_for(args, config, other))["heldout"]["oov_rate"]}
    print(format_stats(stats))
    p = stats["public"]
    print(f"\npublic corpus: {p['source']}: {p['verses']:,} verses, {p['tokens']:,} words, "
          f"{p['distinct_words']:,} distinct")
    print(f"vocabulary: {args.vocabulary} ({len(corpus.vocab.free_slots)} free slots for discovered words); "
          f"held-out OOV rate {stats['oov_rate']['public']:.2%} under the public vocabulary, "
          f"{stats['oov_rate']['users']:.2%} under one built from the training users' text (comparison only)")
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2))
    print(f"(loaded in {time.monotonic() - t0:.1f} s)")


def cmd_pretrain(args) -> None:
    """The CIFG trained centrally on the public text only: the initial model of federated training."""
    import numpy as np

    from contract.model.weights import save_checkpoint
    from models.central import evaluate
    from models.model import weight_layout
    from models.pretrain import PretrainConfig, cache_path, pretrain

    config = model_config(args.config)
    corpus = load_corpus_for(args, config)
    heldout = np.concatenate(list(corpus.heldout.values()))
    if args.max_eval_windows:
        heldout = heldout[np.random.default_rng(0).permutation(len(heldout))[:args.max_eval_windows]]
    dropout_from(args)      # checks the flags
    cfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                         dropout=args.dropout)
    cached = cache_path(config, corpus.vocab, cfg, args.data).is_file()
    print(f"pretraining on the public text only ({args.vocabulary} vocabulary){'; cached' if cached else ''}")
    flat, history = pretrain(config, corpus.vocab, cfg, args.data, heldout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus.vocab.save(out / "vocab.json")
    save_checkpoint(out / "pretrained.safetensors", weight_layout(config), flat,
                    {"model_config": dataclasses.asdict(config), "history": history, "trained_on": "public",
                     "vocab_sha256": corpus.vocab.sha256})
    for row in history:
        print(f"epoch {row['epoch']}: public train loss {row['train_loss']:.3f} ({row['seconds']:.0f} s)")
    final = evaluate(config, flat, heldout).as_dict()
    print(f"pretrained (public text only), on {len(heldout):,} held-out users' windows: top-1 {final['top1']:.4f}, "
          f"top-3 {final['top3']:.4f}, loss {final['loss']:.3f}; checkpoint {out / 'pretrained.safetensors'}, "
          f"vocabulary {out / 'vocab.json'}")


def cmd_central(args) -> None:
    from models.central import train_central
    from models.model import weight_layout
    from contract.model.weights import save_checkpoint

    config = model_config(args.config)
    corpus = load_corpus_for(args, config)
    heldout = list(corpus.heldout.values())
    import numpy as np

    result = train_central(config, list(corpus.train.values()), np.concatenate(heldout),
                           epochs=args.epochs, batch_size=args.batch_size,
                           learning_rate=args.lr, seed=args.seed, dropout=dropout_from(args))
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


def cmd_discover(args) -> None:
    """Federated discovery of the training users' new words, in simulation; the grown vocabulary."""
    from contract.tasks.discovery import DiscoverySpec
    from models.discovery import DiscoveryConfig, device_words, run_discovery, score, true_top
    from models.public_corpus import oov_rate

    config = model_config(args.config)
    corpus = load_corpus_for(args, config)
    try:
        spec = DiscoverySpec(min_devices=args.min_devices, max_word_length=args.max_word_length,
                             votes_per_device=args.votes_per_device).validate()
    except ValueError as e:
        raise UsageError(str(e).replace("discovery.", "--").replace("_", "-")) from None
    words = device_words(corpus.train_texts, corpus.vocab)
    run = run_discovery(words, DiscoveryConfig(spec, args.devices_per_level, args.passes, args.seed))
    free = len(corpus.vocab.free_slots)
    grown = corpus.vocab.with_words(run["words"][:free])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grown.save(out / "vocab.json")
    (out / "discovered.json").write_text(json.dumps({"words": run["words"], "votes": run["votes"],
                                                     "rounds": run["rounds"], "privacy": run["privacy"]}, indent=1))
    s = score(run["words"], true_top(words, free, spec.max_word_length), words, spec.min_devices)
    heldout = [t for ts in corpus.heldout_texts.values() for t in ts]
    p = run["privacy"]
    print(f"{s['found']:,} words found by at least {spec.min_devices} devices in {run['rounds']} rounds "
          f"({run['participations']:,} participations); precision {s['precision']:.3f}, recall {s['recall']:.3f} "
          f"against the true top {free:,}; {s['revealed_below_threshold']} below the threshold; "
          + (f"(ε, δ) = ({p['epsilon']:.2f}, {p['delta']:.1e})" if p["epsilon"] is not None else
             "no (ε, δ): the min_devices threshold only (more than one vote per device, or no sampling)"))
    print(f"held-out OOV rate {oov_rate(heldout, corpus.vocab):.2%} → {oov_rate(heldout, grown):.2%} with the "
          f"first {min(free, s['found'])} in the vocabulary's free slots; wrote {out / 'vocab.json'} and "
          f"{out / 'discovered.json'}")


def cmd_ngram(args) -> None:
    from models.ngram import KneserNeyTrigram

    config = model_config(args.config)
    corpus = load_corpus_for(args, config)
    t0 = time.monotonic()
    if args.train_on == "public":
        from contract.model.text import to_sequences
        from models.public_corpus import load_verses

        train = [to_sequences(load_verses(args.data), corpus.vocab, config.seq_len)]
    else:
        train = list(corpus.train.values())
    model = KneserNeyTrigram(len(corpus.vocab)).fit(train)
    hits = model.evaluate(list(corpus.heldout.values())).as_dict()
    print(f"Kneser-Ney trigram ({args.train_on} text) on held-out clients: top-1 {hits['top1']:.4f}, "
          f"top-3 {hits['top3']:.4f} over {hits['positions']} positions "
          f"({time.monotonic() - t0:.0f} s)")


def cmd_evaluate(args) -> None:
    from models.central import evaluate

    config = model_config(args.config)
    flat = read_checkpoint(args.checkpoint, config)
    corpus = load_corpus_for(args, config)
    ev = evaluate(config, flat, list(corpus.heldout.values())).as_dict()
    print(json.dumps(ev, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m models", description=__doc__)
    common = common_flags()
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("corpus", parents=[common], help="fetch the corpus and print its statistics")
    c.add_argument("--json", help="also write the statistics to this JSON file")
    c.set_defaults(func=cmd_corpus)

    add_simulate_commands(sub, common)

    ce = sub.add_parser("central", parents=[common], help="train the CIFG centrally (baseline)")
    ce.add_argument("--epochs", type=int, default=2)
    ce.add_argument("--batch-size", type=int, default=64)
    ce.add_argument("--lr", type=float, default=2e-3)
    ce.add_argument("--seed", type=int, default=0)
    ce.add_argument("--out", default="runs/central")
    add_dropout_flags(ce)
    ce.set_defaults(func=cmd_central)

    pt = sub.add_parser("pretrain", parents=[common], help="train the CIFG centrally on public text only")
    from models.pretrain import PretrainConfig

    pc = PretrainConfig()
    pt.add_argument("--epochs", type=int, default=pc.epochs)
    pt.add_argument("--batch-size", type=int, default=pc.batch_size)
    pt.add_argument("--lr", type=float, default=pc.learning_rate)
    pt.add_argument("--seed", type=int, default=pc.seed)
    pt.add_argument("--max-eval-windows", type=int, default=None)
    pt.add_argument("--out", default="runs/pretrained")
    add_dropout_flags(pt, placement=False)
    pt.set_defaults(func=cmd_pretrain)

    from contract.tasks.discovery import DiscoverySpec

    ds = DiscoverySpec()
    dv = sub.add_parser("discover", parents=[common], help="federated discovery of new words (simulation)")
    dv.add_argument("--min-devices", type=int, default=ds.min_devices)
    dv.add_argument("--max-word-length", type=int, default=ds.max_word_length)
    dv.add_argument("--votes-per-device", type=int, default=100)
    dv.add_argument("--devices-per-level", type=int, default=0, help="devices sampled per level (0: all)")
    dv.add_argument("--passes", type=int, default=2)
    dv.add_argument("--seed", type=int, default=0)
    dv.add_argument("--out", default="runs/discovery")
    dv.set_defaults(func=cmd_discover)

    n = sub.add_parser("ngram", parents=[common], help="Kneser-Ney trigram baseline")
    n.add_argument("--train-on", choices=["users", "public"], default="users",
                   help="the training users' text (the baseline) or the public text only")
    n.set_defaults(func=cmd_ngram)

    e = sub.add_parser("evaluate", parents=[common], help="score a checkpoint on held-out clients")
    e.add_argument("--checkpoint", required=True)
    e.set_defaults(func=cmd_evaluate)

    return p


# the least value of each count flag (whichever command has it)
MINIMUM = {**{name: 1 for name in ("rounds", "clients_per_round", "local_epochs", "batch_size", "eval_every",
                                   "epochs", "max_client_examples", "max_eval_windows", "passes")},
           "server_lr_warmup_rounds": 0, "server_lr_decay_rounds": 0, "devices_per_level": 0}


def check_minimums(args: argparse.Namespace) -> None:
    for name, least in MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {least}")


def main(argv: list[str] | None = None) -> int:
    from models.corpus import CorpusError
    from models.tff_runtime import install_exit_handlers

    install_exit_handlers()
    return run(build_parser(), argv, user_errors=(CorpusError,), validate=check_minimums)


if __name__ == "__main__":
    sys.exit(main())
