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


def _model_config(name: str):
    from models.model import CONFIGS

    return CONFIGS[name]


def _load_corpus(args, model_config, vocabulary: str | None = None):
    from models.corpus import load_corpus

    return load_corpus(data_dir=args.data, vocab_size=model_config.vocab_size - 4,
                       seq_len=model_config.seq_len, seed=args.split_seed,
                       vocabulary=vocabulary or args.vocabulary)


def cmd_corpus(args) -> None:
    from models.corpus import corpus_stats, format_stats
    from models.public_corpus import load_verses, stats as public_stats

    t0 = time.monotonic()
    config = _model_config(args.config)
    corpus = _load_corpus(args, config)
    stats = corpus_stats(corpus)
    stats["vocabulary"] = args.vocabulary
    stats["public"] = public_stats(load_verses(args.data))
    other = "users" if args.vocabulary == "public" else "public"
    stats["oov_rate"] = {args.vocabulary: stats["heldout"]["oov_rate"],
                         other: corpus_stats(_load_corpus(args, config, other))["heldout"]["oov_rate"]}
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

    from contract.weights import save_checkpoint
    from models.central import evaluate
    from models.model import weight_layout
    from models.pretrain import PretrainConfig, cache_path, pretrain

    config = _model_config(args.config)
    corpus = _load_corpus(args, config)
    heldout = np.concatenate(list(corpus.heldout.values()))
    if args.max_eval_windows:
        heldout = heldout[np.random.default_rng(0).permutation(len(heldout))[:args.max_eval_windows]]
    cfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
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
                           max_eval_windows=args.max_eval_windows, seed=args.seed, update=update,
                           attack=_attack_settings(args), **_dp_settings(args))
    initial = _read_checkpoint(args.init, config) if args.init else None
    corpus = _load_corpus(args, config)
    if sim.attack is not None:
        try:
            sim.attack.validate(corpus.vocab)
        except ValueError as e:
            raise _UsageError(str(e)) from None
    summary = run_simulation(corpus, config, sim, args.out, initial=initial)
    print(_summary_table("federated (TFF simulation)", summary["initial"], summary["final"]))
    print(f"rounds: {sim.rounds}, wall time {summary['wall_s']:.0f} s; upload "
          f"{summary['upload_bytes_per_client'] / 1e6:.3f} MB per client and round ({update.bits}-bit"
          f"{', rotated' if update.rotation else ''}, clip {update.clip_norm:g}, max weight "
          f"{update.max_weight}); metrics, checkpoints and curves.png in {args.out}")
    if sim.attack is not None:
        a = sim.attack
        print(f"attack: {a.attack} by {a.fraction:.0%} of each round's clients; backdoor success "
              f"{summary['final']['backdoor_success']:.0%} (first suggestion after '{a.trigger}' is "
              f"'{a.target}'); canary: {summary['canary']}")
    dp = summary["dp"]
    if dp:
        label = (f"PROJECTION for a deployment of {dp['population']:,} devices with {dp['reports_per_round']:,} "
                 f"reports per round (noise scaled to it; trained on {sim.clients_per_round} clients per round)"
                 if dp["projection"] else f"{dp['population']:,} devices, {dp['reports_per_round']} per round")
        print(f"differential privacy: noise multiplier {dp['noise_multiplier']:g}, ε = {dp['epsilon']:.3f} at "
              f"δ = {dp['delta']:.3g} ({dp['accountant']}) after {dp['rounds']} rounds; {label}")


def _attack_settings(args):
    """The AttackConfig of `python -m models attack` (None for simulate)."""
    from models.attacks import AttackConfig

    if getattr(args, "attack", None) is None:
        return None
    cfg = AttackConfig(args.attack, args.attacker_fraction, args.attack_scale, args.attack_boost, args.trigger,
                       args.target)
    try:
        return cfg.validate()
    except ValueError as e:
        raise _UsageError(str(e)) from None


def _dp_settings(args) -> dict:
    """SimulationConfig's DP fields from the --dp-* flags (none unless --dp-noise-multiplier is given)."""
    from contract.dp import DPSpec

    if args.dp_noise_multiplier is None:
        if any(getattr(args, k) is not None for k in ("dp_deploy_reports", "dp_population", "dp_delta")):
            raise _UsageError("--dp-deploy-reports, --dp-population and --dp-delta need --dp-noise-multiplier")
        return {}
    spec = DPSpec(mechanism=args.dp_mechanism, noise_multiplier=args.dp_noise_multiplier,
                  initial_clip=args.dp_initial_clip,
                  target_quantile=args.dp_target_quantile, clip_learning_rate=args.dp_clip_lr,
                  clipped_count_stddev=args.dp_clipped_count_stddev)
    try:
        spec.validate("--dp")
        spec.split(args.dp_deploy_reports or args.clients_per_round)
    except ValueError as e:
        raise _UsageError(str(e).replace("--dp.", "--dp-").replace("_", "-")) from None
    for flag in ("dp_deploy_reports", "dp_population"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise _UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.dp_delta is not None and not 0 < args.dp_delta < 1:
        raise _UsageError("--dp-delta must be in (0, 1)")
    return {"dp": spec, "dp_deploy_reports": args.dp_deploy_reports, "dp_population": args.dp_population,
            "dp_delta": args.dp_delta}


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


def cmd_discover(args) -> None:
    """Federated discovery of the training users' new words, in simulation; the grown vocabulary."""
    from contract.discovery import DiscoverySpec
    from models.discovery import DiscoveryConfig, device_words, run_discovery, score, true_top
    from models.public_corpus import oov_rate

    config = _model_config(args.config)
    corpus = _load_corpus(args, config)
    try:
        spec = DiscoverySpec(min_devices=args.min_devices, max_word_length=args.max_word_length,
                             votes_per_device=args.votes_per_device).validate()
    except ValueError as e:
        raise _UsageError(str(e).replace("discovery.", "--").replace("_", "-")) from None
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

    config = _model_config(args.config)
    corpus = _load_corpus(args, config)
    t0 = time.monotonic()
    if args.train_on == "public":
        from contract.text import to_sequences
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
    from models.corpus import VOCABULARIES
    from models.simulate import SERVER_OPTIMIZERS, SimulationConfig

    p = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", choices=["gboard", "tiny"], default="gboard",
                        help="model size (tiny: tests and quick runs)")
    common.add_argument("--data", default=None, help="data directory (default: ./data or $NIGHTJAR_DATA)")
    common.add_argument("--split-seed", type=int, default=0, help="seed of the train/held-out client split")
    common.add_argument("--vocabulary", choices=VOCABULARIES, default="public",
                        help="public: from public text (default); users: from the training users' text, "
                             "for comparison only")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("corpus", parents=[common], help="fetch the corpus and print its statistics")
    c.add_argument("--json", help="also write the statistics to this JSON file")
    c.set_defaults(func=cmd_corpus)

    d = SimulationConfig()
    s = argparse.ArgumentParser(add_help=False)          # simulate's flags, shared by attack
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
    from contract.dp import DPSpec

    dps = DPSpec()
    s.add_argument("--dp-noise-multiplier", type=float, default=None,
                   help="user-level DP-FedAvg with adaptive clipping (TFF's gaussian_adaptive) at this z")
    s.add_argument("--dp-mechanism", choices=("central", "distributed"), default=dps.mechanism,
                   help="central: TFF's gaussian_adaptive; distributed: the phones' discrete Gaussian shares "
                        "under secure aggregation (contract pipeline, --update-bits)")
    s.add_argument("--dp-initial-clip", type=float, default=dps.initial_clip)
    s.add_argument("--dp-target-quantile", type=float, default=dps.target_quantile)
    s.add_argument("--dp-clip-lr", type=float, default=dps.clip_learning_rate)
    s.add_argument("--dp-clipped-count-stddev", type=float, default=None,
                   help="noise on the unclipped count (default 0.05 x reports per round)")
    s.add_argument("--dp-deploy-reports", type=int, default=None,
                   help="projection: add the noise of a deployment with this many reports per round")
    s.add_argument("--dp-population", type=int, default=None,
                   help="devices in the (projected) population, for ε (default: the training clients)")
    s.add_argument("--dp-delta", type=float, default=None, help="δ of ε (default: population^-1.1)")
    s.add_argument("--out", default="runs/simulate", help="output directory")
    sub.add_parser("simulate", parents=[common, s], help="federated training with TFF").set_defaults(func=cmd_simulate)
    from models.attacks import ATTACKS, AttackConfig

    a, ad = sub.add_parser("attack", parents=[common, s], help="federated training with a minority of attackers "
                           "(models.attacks): main-task quality, backdoor success, the canary"), AttackConfig()
    a.add_argument("--attack", choices=ATTACKS[1:], required=True)
    a.add_argument("--attacker-fraction", type=float, default=ad.fraction, help="of each round's clients")
    a.add_argument("--attack-scale", type=float, default=ad.scale, help="random/sign_flip/scaled: x an honest norm")
    a.add_argument("--attack-boost", type=float, default=None, help="model_replacement (default clients / server lr)")
    a.add_argument("--trigger", default=ad.trigger, help="backdoor: the context")
    a.add_argument("--target", default=ad.target, help="backdoor: the word it should suggest next")
    a.set_defaults(func=cmd_simulate)

    ce = sub.add_parser("central", parents=[common], help="train the CIFG centrally (baseline)")
    ce.add_argument("--epochs", type=int, default=2)
    ce.add_argument("--batch-size", type=int, default=64)
    ce.add_argument("--lr", type=float, default=2e-3)
    ce.add_argument("--seed", type=int, default=0)
    ce.add_argument("--out", default="runs/central")
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
    pt.set_defaults(func=cmd_pretrain)

    from contract.discovery import DiscoverySpec

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


def main(argv: list[str] | None = None) -> int:
    from models.tff_runtime import install_exit_handlers

    install_exit_handlers()
    args = build_parser().parse_args(argv)
    minimum = {name: 1 for name in ("rounds", "clients_per_round", "local_epochs", "batch_size",
                                     "eval_every", "epochs", "max_client_examples",
                                     "max_eval_windows", "passes")}
    minimum.update(server_lr_warmup_rounds=0, server_lr_decay_rounds=0, devices_per_level=0)
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
