"""`python -m models simulate` and `python -m models attack`: federated training in TFF, with DP and attacks.

Both commands take the same flags (the simulation's config, the update
pipeline, DP); `attack` adds a minority of attacking clients (models.attacks).
"""
from __future__ import annotations

import argparse
import dataclasses

from contract.cli import UsageError
from models.cli_common import (add_dropout_flags, dropout_from, load_corpus_for, model_config, read_checkpoint,
                               summary_table)


def cmd_simulate(args) -> None:
    from contract.update.spec import UpdateSpec
    from models.simulate import SimulationConfig, run_simulation

    config = model_config(args.config)
    update = UpdateSpec(bits=args.update_bits, rotation=args.update_rotation,
                        clip_norm=args.update_clip_norm, weighting=args.update_weighting,
                        block_size=args.update_block_size, zeroing=args.update_zeroing,
                        aggregator=args.update_aggregator, trim=args.update_trim)
    if args.update_max_weight is not None:
        update = dataclasses.replace(update, max_weight=args.update_max_weight)
    else:
        update = update.scaled_to_epochs(args.local_epochs)
    try:
        update.validate("--update")
    except ValueError as e:
        raise UsageError(str(e).replace("--update.", "--update-").replace("_", "-")) from None
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
                           attack=_attack_settings(args), dropout=dropout_from(args), **_dp_settings(args))
    initial = read_checkpoint(args.init, config) if args.init else None
    corpus = load_corpus_for(args, config)
    sim = _ftrl_settled(sim, args, len(corpus.train))
    if sim.attack is not None:
        try:
            sim.attack.validate(corpus.vocab)
        except ValueError as e:
            raise UsageError(str(e)) from None
    summary = run_simulation(corpus, config, sim, args.out, initial=initial)
    print(summary_table("federated (TFF simulation)", summary["initial"], summary["final"]))
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
        if dp.get("mechanism") == "ftrl":
            print(_ftrl_line(dp))


def _ftrl_line(dp: dict) -> str:
    c = dp["simulated_cohort"]
    return (f"DP-FTRL (tree, restarts every {dp['restart_every']}): ε for b = {dp['separation']}, k = "
            f"{dp['max_participations']} per horizon of {dp['horizon']} rounds, {dp['assumption_text']}; "
            f"the simulated clients took part under b = {c['separation']}, k = {c['max_participations']}")


def _ftrl_settled(sim, args, training_clients: int):
    """`sim` with DP-FTRL's participation filled in (models.dp_ftrl.resolve) for this population or
    the projected deployment, checked against the clients there are; unchanged for other mechanisms."""
    if sim.dp is None or sim.dp.mechanism != "ftrl":
        return sim
    from models.dp_ftrl import cohort_rule, resolve

    population = sim.dp_population or training_clients
    reports = sim.dp_deploy_reports or sim.clients_per_round
    try:
        sim = dataclasses.replace(sim, dp=resolve(sim.dp, population, reports, sim.rounds,
                                                  args.dp_min_separation_rounds, args.dp_max_participations,
                                                  args.dp_horizon_rounds))
        cohort_rule(sim, training_clients)
    except ValueError as e:
        raise UsageError(str(e).replace("--dp.", "--dp-").replace("_", "-")) from None
    return sim


def _attack_settings(args):
    """The AttackConfig of `python -m models attack` (None for simulate)."""
    from models.attacks import AttackConfig

    if getattr(args, "attack", None) is None:
        return None
    cfg = AttackConfig(args.attack, args.attacker_fraction, args.attack_scale, args.attack_boost, args.trigger,
                       args.target, sybil_norm=args.sybil_norm)
    try:
        return cfg.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None


def _dp_settings(args) -> dict:
    """SimulationConfig's DP fields from the --dp-* flags (none unless --dp-noise-multiplier is given)."""
    from contract.dp.noise import DPSpec

    if args.dp_noise_multiplier is None:
        if any(getattr(args, k) is not None for k in ("dp_deploy_reports", "dp_population", "dp_delta")):
            raise UsageError("--dp-deploy-reports, --dp-population and --dp-delta need --dp-noise-multiplier")
        return {}
    _check_ftrl_flags(args)
    if args.update_zeroing:
        raise UsageError("--update-zeroing draws its threshold from other devices' norms, which DP's "
                         "accounting does not cover: use it without --dp-noise-multiplier")
    spec = DPSpec(mechanism=args.dp_mechanism, noise_multiplier=args.dp_noise_multiplier,
                  initial_clip=args.dp_initial_clip,
                  target_quantile=args.dp_target_quantile, clip_learning_rate=args.dp_clip_lr,
                  clipped_count_stddev=args.dp_clipped_count_stddev, restart_every=args.dp_restart_every or 0)
    try:
        spec.validate("--dp")
        if spec.mechanism != "ftrl":        # DP-FTRL's z is the tree's alone; its σ_b is apart
            spec.split(args.dp_deploy_reports or args.clients_per_round)
    except ValueError as e:
        raise UsageError(str(e).replace("--dp.", "--dp-").replace("_", "-")) from None
    for flag in ("dp_deploy_reports", "dp_population"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.dp_delta is not None and not 0 < args.dp_delta < 1:
        raise UsageError("--dp-delta must be in (0, 1)")
    return {"dp": spec, "dp_deploy_reports": args.dp_deploy_reports, "dp_population": args.dp_population,
            "dp_delta": args.dp_delta}


FTRL_FLAGS = ("dp_min_separation_rounds", "dp_max_participations", "dp_horizon_rounds", "dp_restart_every")


def _check_ftrl_flags(args) -> None:
    """DP-FTRL's flags: only with --dp-mechanism ftrl, integers >= 1 (restart >= 0), and a projection
    names both the deployment's reports and its population."""
    given = [f for f in FTRL_FLAGS if getattr(args, f) is not None]
    if args.dp_mechanism != "ftrl":
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --dp-mechanism ftrl")
        return
    for flag in given:
        if getattr(args, flag) < (0 if flag == "dp_restart_every" else 1):
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'dp_restart_every' else 1}")
    if (args.dp_deploy_reports is None) != (args.dp_population is None):
        raise UsageError("--dp-mechanism ftrl: --dp-deploy-reports and --dp-population go together "
                         "(the deployment the projection is for)")


def _add_ftrl_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--dp-mechanism", choices=("central", "distributed", "ftrl"), default="central",
                   help="central: TFF's gaussian_adaptive; distributed: the phones' discrete Gaussian shares "
                        "under secure aggregation (contract pipeline, --update-bits); ftrl: DP-FTRL, the "
                        "server's tree noise (z per node) under (k, b)-participation (models.dp_ftrl)")
    s.add_argument("--dp-min-separation-rounds", type=int, default=None,
                   help="ftrl: b, rounds between two participations of a client (default: population / reports)")
    s.add_argument("--dp-max-participations", type=int, default=None,
                   help="ftrl: k, participations per horizon (default: what b allows, ⌈horizon / b⌉)")
    s.add_argument("--dp-horizon-rounds", type=int, default=None, help="ftrl: n, the accounting horizon "
                   "(default: --rounds)")
    s.add_argument("--dp-restart-every", type=int, default=None,
                   help="ftrl: restart the tree every this many rounds (default 0: chosen for the least noise)")


def _update_flags(s: argparse.ArgumentParser) -> None:
    """The --update-* flags: contract.update.spec.UpdateSpec, what each client's update goes through."""
    from contract.update.hadamard import BLOCK_SIZES
    from contract.update.robust import AGGREGATORS
    from contract.update.spec import BITS, WEIGHTINGS, UpdateSpec

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
    s.add_argument("--update-aggregator", choices=AGGREGATORS, default=u.aggregator,
                   help="mean, or a robust rule over every update (needs --update-weighting uniform)")
    s.add_argument("--update-trim", type=float, default=u.trim, help="trimmed_mean: the fraction cut at each end")
    s.add_argument("--update-zeroing", type=float, default=u.zeroing,
                   help="zero an update whose norm is above this many times the last round's median (0: off)")


def _dp_flags(s: argparse.ArgumentParser) -> None:
    """The --dp-* flags: DP-FedAvg or DP-FTRL (contract.dp.noise.DPSpec) and ε's projection."""
    from contract.dp.noise import DPSpec

    dps = DPSpec()
    s.add_argument("--dp-noise-multiplier", type=float, default=None,
                   help="user-level DP-FedAvg with adaptive clipping (TFF's gaussian_adaptive) at this z")
    _add_ftrl_flags(s)
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


def add_simulate_commands(sub, common: argparse.ArgumentParser) -> None:
    """The `simulate` and `attack` subcommands on `sub` (an argparse subparsers object)."""
    from contract.optimizers import SERVER_OPTIMIZERS
    from models.simulate import SimulationConfig

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
    _update_flags(s)
    s.add_argument("--init", help="start from this checkpoint instead of the seeded initial model")
    add_dropout_flags(s)
    _dp_flags(s)
    s.add_argument("--out", default="runs/simulate", help="output directory")
    sub.add_parser("simulate", parents=[common, s], help="federated training with TFF").set_defaults(func=cmd_simulate)
    from models.attacks import ATTACKS, AttackConfig

    a, ad = sub.add_parser("attack", parents=[common, s], help="federated training with a minority of attackers "
                           "(models.attacks): main-task quality, backdoor success, the canary"), AttackConfig()
    a.add_argument("--attack", choices=ATTACKS[1:], required=True)
    a.add_argument("--attacker-fraction", type=float, default=ad.fraction, help="of each round's clients")
    a.add_argument("--attack-scale", type=float, default=ad.scale, help="random/sign_flip/scaled: x an honest norm")
    a.add_argument("--attack-boost", type=float, default=None, help="model_replacement (default clients / server lr)")
    a.add_argument("--sybil-norm", type=float, default=ad.sybil_norm,
                   help="sybil: the shared update's norm, x the round's median honest norm")
    a.add_argument("--trigger", default=ad.trigger, help="backdoor: the context")
    a.add_argument("--target", default=ad.target, help="backdoor: the word it should suggest next")
    a.set_defaults(func=cmd_simulate)
