"""`make demo`: the whole system, end to end, on this machine, in simulated time.

1. the federated Shakespeare corpus (`models.corpus`) under the public
   vocabulary (`models.public_corpus`);
2. the Gboard-size CIFG pretrained on public text only (`models.pretrain`,
   cached in the data directory after the first run), exported as a LiteRT
   training plan (`tflite_export`);
3. the real server — `python -m server init`, then `python -m server run`
   (gunicorn, SQLite, a local artifact folder) on a loopback port, on a
   simulated clock;
4. a fleet of phones (`emulation.fleet`): each a real device runtime
   whose user is one training client of the corpus, in one of six time
   zones, charging overnight (mostly), training when its policy allows;
5. rounds until enough have completed and at least two app-model versions
   are published, with a pass of federated discovery of new words after
   every 15 training rounds; then the held-out quality of every evaluated and
   published version (`models.central.evaluate`, `contract.model.metrics`), a
   summary, two PNGs and `benchmarks/results/demo.json`;
6. every process it started is stopped, and that is checked.

It uses the same harness as the end-to-end tests (`emulation`), so the demo
runs exactly what the tests check.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import psutil
from tqdm import tqdm

from benchmarks import RESULTS, parse_config, write_result

REPO = Path(__file__).resolve().parents[1]
POPULATION = "en-keyboard"
DEMO_START_UTC = 1_795_464_000.0   # Mon 2026-11-23 20:00 UTC: night in Asia, evening in Europe
# Where the phones are: twelve time zones two hours apart, so some are always at night and rounds
# run around the clock (a real population's nights are lumpier: its rounds would pause).
ZONES = tuple(float(h) for h in range(-10, 13, 2))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    phones: int = 240
    rounds: int = 30              # training rounds to complete (at least)
    published: int = 2            # published app-model versions to reach (at least)
    clock_speed: float = 240.0    # simulated seconds per real second
    max_fleet_wall_s: float = 780.0
    eval_windows: int = 3000      # held-out windows evaluated per version (fixed, seeded sample)
    workers: int = 32
    trainers: int = 2
    personal_models: float = 0.05  # phones keeping a personal model for their suggestions
    seed: int = 0


# The population: FedAvg (server sgd, lr 1) over phones running client SGD at lr 0.3 — stable for
# this model in TFF simulation (lr 0.5 with server Adam diverged after ~10 rounds). Rounds of 20
# reports from up to 26 phones; a round goes ahead with half of that, because only about a fifth
# of the fleet is eligible at any hour (asleep, charging, on Wi-Fi, in the 22-06 window). Phones
# evaluate every other version on their own text; a version is published when that evaluation's
# top-3 is not worse than the last published one's (the server's rule) — early on it climbs, later
# the on-device evaluation's noise decides.
POPULATION_SETTINGS = dict(
    goal=20, min_round_size=5, over_selection=1.3, min_selected_fraction=0.5, min_report_fraction=0.5,
    selection_window_s=900.0, reporting_window_s=2400.0, client_lr=0.3, client_epochs=2,
    client_batch_size=16, client_max_examples=64, server_optimizer="sgd", server_lr=1.0,
    eval_every=2, publish_every=2, eligibility={"min_separation_s": 3600.0},
    # The server sees only each round's sum (server/secagg.py). Its windows are simulated time:
    # at 240x, five minutes for the last keys are 1.25 s of wall time.
    secure_aggregation=True,
    secagg={"keys_window_s": 300.0, "shares_window_s": 600.0, "unmask_window_s": 900.0},
    # After every 15 training rounds, a pass of discover rounds (one per letter) finds the words that
    # at least 5 phones typed and the public vocabulary lacks; they join a new version's free slots.
    discovery={"every": 15, "min_devices": 5, "max_word_length": 10, "votes_per_device": 100},
    # Distributed DP under secure aggregation (contract/dp/noise.py, server/README.md): each phone adds its
    # share of discrete Gaussian noise before masking, and the ledger gives every version its ε.
    # With 20 reports per round of a 1.4M-parameter update, noise that keeps the model learning is
    # tiny (z = 0.004): the ε it buys is astronomical, which is the point of printing it — user-level
    # DP needs thousands of reports per round (`make bench-dp` projects Gboard's scale).
    dp={"mechanism": "distributed", "noise_multiplier": 0.004, "initial_clip": 1.0},
    # Personal models (contract.tasks.personal): published versions come with what a phone personalizes
    # them with; after every 10 training rounds a round evaluates personalization on the phones,
    # which report only counts and two one-hot top-1 buckets (the server keeps their sum).
    personalization={"epochs": 1, "lr": 0.05, "cache_weight": 0.1}, personal_eval_every=10)


def prepare(cfg: DemoConfig, out: Path, settings: dict | None = None):
    """Corpus, the public-pretrained Gboard model and its training plan, server config with the
    shared clock (the population's `settings`: POPULATION_SETTINGS unless given)."""
    from models.corpus import load_corpus
    from models.model import GBOARD
    from models.pretrain import pretrain
    from emulation.deployment import simulated_clock, write_server_config
    from emulation.models import initial_model

    corpus = load_corpus(vocab_size=GBOARD.vocab_size - 4, seq_len=GBOARD.seq_len)
    flat, _ = pretrain(GBOARD, corpus.vocab)          # public text only; cached after the first demo
    model = initial_model(out / "model", corpus, GBOARD, flat=flat)
    config = write_server_config(out / "server", POPULATION, **(settings or POPULATION_SETTINGS),
                                 server=simulated_clock(DEMO_START_UTC, cfg.clock_speed))
    return corpus, model, config


def run_fleet(cfg: DemoConfig, out: Path, server, corpus, attack=None):
    """The demo's fleet against `server` until `cfg.rounds` training rounds and `cfg.published` published
    versions (or the wall budget); `attack` (emulation.attackers.FleetAttack) makes some phones attackers."""
    from deploy.server_process import operator_token
    from emulation.deployment import enrollment
    from emulation.fleet import FleetConfig, FleetStatus, build_fleet, read_server_clock, shared_clock
    from emulation.world import FleetMix

    start, speed, epoch = read_server_clock(server.config)
    clock = shared_clock(start, speed, epoch)
    fleet = build_fleet(FleetConfig(server.url, out / "fleet", POPULATION, clock,
                                    workers=cfg.workers, trainers=cfg.trainers, mix=FleetMix(zones_h=ZONES),
                                    enrollment=enrollment(server.config, POPULATION, now=clock.now),
                                    operator_token=operator_token(server.config), seed=cfg.seed,
                                    attack=attack, personal_models=cfg.personal_models),
                        cfg.phones, corpus.train_texts)
    told: set[int] = set()

    def narrate(s: FleetStatus) -> None:
        for r in sorted(s.rounds, key=lambda r: r["round"]):
            if r["state"] in ("completed", "failed") and r["round"] not in told:
                told.add(r["round"])
                result = f"→ version {r['result_version']}" if r.get("result_version") else r["reason"] or ""
                upload = (f"  up {r['bytes_in'] / 1e6:5.1f} MB ({r['bytes_in'] / r['reported'] / 1e6:.2f}"
                          f" MB/device)" if r["task"] == "train" and r["reported"] else "")
                tqdm.write(f"  round {r['round']:>3} {r['task']:<5} {r['state']:<9} selected {r['selected']:>2}"
                           f"  reported {r['reported']:>2}  failed {r['failed']:>2}  dropped {r['dropped']:>2}"
                           f"  aborted {r['aborted']:>2}{upload}  {result}")

    def done(s: FleetStatus) -> bool:
        return s.train_completed >= cfg.rounds and len(s.published) >= cfg.published

    t0, sim0 = time.monotonic(), fleet.config.clock.now()
    try:
        status = fleet.run(done, max_wall_s=cfg.max_fleet_wall_s, progress_total=cfg.rounds,
                           on_status=narrate)
    finally:
        fleet.close()
    return fleet, status, time.monotonic() - t0, sim0


def main() -> int:
    from benchmarks.demo_report import evaluate_versions, plot_participation, plot_quality, summary_table
    from emulation.deployment import init_population
    from emulation.report import format_summary, summarize
    from deploy.server_process import ServerProcess, free_port

    cfg, paths = parse_config(DemoConfig, __doc__, out=REPO / "runs" / "demo")
    out = paths["out"]
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    timings = {}

    print(f"[1/4] corpus, the Gboard-size model pretrained on public text and its LiteRT training plan -> {out}",
          flush=True)
    corpus, model, server_config = prepare(cfg, out)
    init_population(server_config, model, POPULATION)
    timings["prepare_s"] = time.monotonic() - t_start

    server = ServerProcess(server_config, free_port(), out / "server" / "server.log", workers=2, threads=8)
    try:
        print(f"[2/4] server on {server.url} (gunicorn, SQLite, {out / 'server' / 'state'}); "
              f"{cfg.phones} phones, simulated time x{cfg.clock_speed:.0f}", flush=True)
        server.start()
        print(f"      watch it live: http://localhost:{server.port}/dashboard (sign in with the token in "
              f"{out / 'server' / 'state' / 'private' / 'operator_token'})", flush=True)
        fleet, status, fleet_wall, sim0 = run_fleet(cfg, out, server, corpus)
        timings["fleet_s"] = fleet_wall
        summary = summarize(fleet, status, fleet_wall, sim0)
        print(format_summary(summary), flush=True)
        print("[3/4] held-out evaluation of the model versions", flush=True)
        t0 = time.monotonic()
        quality = evaluate_versions(server, status, model, corpus, cfg.eval_windows,
                                    out / "versions", cfg.seed)
        timings["evaluation_s"] = time.monotonic() - t0
        rounds = [_round_detail(server, r["round"]) for r in summary["rounds"]]
        discovered = server.operator_get(f"/v1/populations/{POPULATION}/discovery").json()
        personal = next((dict(r["personalization"], round=r["round"], model_version=r["model_version"])
                         for r in reversed(rounds) if r["task"] == "personalize" and r.get("personalization")),
                        None)
        ledger = server.operator_get(f"/v1/populations/{POPULATION}/privacy").json()
    finally:
        server.kill()
    leftover = [c for c in psutil.Process().children(recursive=True) if c.is_running()
                and c.status() != psutil.STATUS_ZOMBIE]
    for c in leftover:
        c.kill()

    print("[4/4] results", flush=True)
    plot_quality(quality, RESULTS / "demo_quality.png")
    plot_participation(rounds, fleet.hourly, RESULTS / "demo_participation.png", len(ZONES))
    wall = time.monotonic() - t_start
    published = [q for q in quality["versions"] if q["published"]]
    uploads = upload_summary(rounds)
    result = {"wall_s": round(wall, 1), "rounds": summary["train_rounds_completed"],
              "published_versions": len(summary["published_versions"]),
              "initial": quality["versions"][0]["heldout"], "final": quality["versions"][-1]["heldout"],
              "final_version": quality["versions"][-1]["version"],
              "final_published": published[-1]["heldout"] if published else None,
              "phones": cfg.phones, "eval_windows": quality["windows"], "timings_s": timings,
              "population": POPULATION_SETTINGS, "demo": dataclasses.asdict(cfg), "uploads": uploads,
              "versions": quality["versions"], "fleet": {k: v for k, v in summary.items() if k != "rounds"},
              "discovered_words": discovered["words"],
              "discover_rounds": sum(1 for r in rounds if r["task"] == "discover"),
              "dp": {k: ledger.get(k) for k in ("dp", "clip", "rounds", "spent")},
              "personalization": personal}
    write_result(RESULTS / "demo.json", result, show=False)
    print(summary_table(quality))
    spec = uploads["spec"]
    weighting = ("unweighted, clipped at the adaptive clip (DP)" if spec["weighting"] == "uniform" else
                 f"clipped at L2 {spec['clip_norm']:g}, weight capped at {spec['max_weight']} (a new population's "
                 "default)")
    print(f"\nupdates: {spec['bits']}-bit{' rotated' if spec['rotation'] else ''}, {weighting}; "
          f"{uploads['mb_per_round']:.1f} MB uploaded per training round, {uploads['mb_per_device']:.2f} MB "
          f"per device ({uploads['float32_mb_per_device']:.2f} MB as float32)")
    if spec.get("secure_aggregation"):
        sa = uploads["secagg"]
        print(f"secure aggregation: on (SecAgg+; {sa['rounds']} training rounds, neighbours k = "
              f"{'/'.join(map(str, sa['k']))}, threshold t = {'/'.join(map(str, sa['t']))}; "
              f"{sa['survivors']} of {sa['members']} devices in the graphs summed): the server saw only "
              "each round's sum")
    if ledger.get("dp"):
        spent = ledger["spent"] or {}
        eps = spent.get("epsilon")
        print(f"differential privacy: {ledger['dp']['mechanism']} (each phone adds its discrete Gaussian share "
              f"before masking), noise multiplier {ledger['dp']['noise_multiplier']:g}, adaptive clip now "
              f"{ledger['clip']:.3g}; after {ledger['rounds']} rounds ε = "
              f"{'inf' if eps is None else format(eps, '.3g')} at δ = {spent.get('delta', float('nan')):.2g} "
              f"({spent.get('accountant')}): no meaningful guarantee at 20 reports per round (make bench-dp)")
    if personal:
        fg, fp = personal["fairness"]["global"], personal["fairness"]["personal"]
        print(f"personalization (round {personal['round']}, version {personal['model_version']}, "
              f"{personal['devices']} phones, each adapting on its first 80% and scored on the rest): top-1 "
              f"global {personal['global']['top1']:.2%} → personal {personal['personal']['top1']:.2%}; "
              f"helped {personal['helped']:.0%}, hurt {personal['hurt']:.0%}, fell back {personal['fell_back']:.0%};"
              f" worst decile {fg['p10']:.1%} → {fp['p10']:.1%} (from the summed histogram); "
              f"{sum(1 for p in fleet.phones if p.personal)} phones suggest from a personal model")
    words = discovered["words"]
    print(f"discovery: {len(words)} new word{'' if len(words) == 1 else 's'} found by at least "
          f"{POPULATION_SETTINGS['discovery']['min_devices']} phones each in {result['discover_rounds']} discover "
          f"rounds{': ' + ', '.join(words[:30]) if words else ''}{' ...' if len(words) > 30 else ''}")
    print(f"\nwall time {wall / 60:.1f} min (prepare {timings['prepare_s']:.0f} s, fleet "
          f"{timings['fleet_s']:.0f} s, evaluation {timings['evaluation_s']:.0f} s); "
          f"wrote benchmarks/results/demo.json, demo_quality.png, demo_participation.png")
    print(f"processes left running: {len(leftover)}" + (" (killed now)" if leftover else ""))
    return 1 if leftover or fleet.errors else 0


def upload_summary(rounds: list[dict]) -> dict:
    """Bytes uploaded per completed training round and per report, and the spec they were sent with."""
    train = [r for r in rounds if r["task"] == "train" and r["state"] == "completed" and r["reported"]]
    spec = train[-1]["update"] if train else {}
    secure = [r["secagg"] for r in train if r.get("secagg")]
    return {"spec": {k: spec.get(k) for k in ("bits", "rotation", "clip_norm", "weighting", "max_weight",
                                              "secure_aggregation", "cohort_max")},
            "secagg": {"rounds": len(secure), "k": sorted({s["k"] for s in secure}),
                       "t": sorted({s["t"] for s in secure}),
                       "members": sum(s["members"] for s in secure), "survivors": sum(s["survivors"] for s in secure)},
            "mb_per_round": sum(r["bytes_in"] for r in train) / max(len(train), 1) / 1e6,
            "mb_per_device": sum(r["bytes_in"] for r in train) / max(sum(r["reported"] for r in train), 1) / 1e6,
            "float32_mb_per_device": 4 * spec.get("size", 0) / 1e6,
            "per_round": [{"round": r["round"], "bytes_in": r["bytes_in"], "reported": r["reported"]}
                          for r in train]}


def _round_detail(server, number: int) -> dict:
    return server.operator_get(f"/v1/populations/{POPULATION}/rounds/{number}").json()


if __name__ == "__main__":
    raise SystemExit(main())
