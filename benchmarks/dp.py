"""DP benchmark: held-out quality against ε, from the public-pretrained model.

`make bench-dp` runs the quality benchmark's federated setting over fewer
rounds (Gboard-size model, pretrained on public text only, public
vocabulary), once without DP and once per row below, all on the same
held-out users and metric as `make bench-quality`:

* central DP (TFF's `gaussian_adaptive` aggregator) and distributed DP (the
  phones' pipeline: 8-bit grid, each client's discrete Gaussian share), at a
  few noise multipliers z, as *projections* for two deployments: N = 10^6
  phones with m = 6,500 reports per round (Gboard's scale) and N = 10^5 with
  m = 500. The simulation trains on its own 10 clients per round and adds
  the noise the deployment would add to its mean (z·C/m); ε is the ledger's
  (privacy.accounting) for `rounds` rounds at q = m/N, δ = N^-1.1;
* the honest row: the real simulated population (the training users), with
  its own 10 reports per round, at z = `honest_z`.

* DP-FTRL beside DP-FedAvg at the same ε (δ = 1e-10), for the same two
  deployments (benchmarks/dp_ftrl.py says how): the rows with "comparison",
  "assumption" ("poisson" or "participation"), b and k. `--rows ftrl` runs
  only these (afresh), keeping every other row and the baseline from dp.json
  (`make bench-dp-ftrl`).

Rows already in dp.json from a run of the same setting (every field but the
row lists) keep their figures, and so does its baseline: a later run adds rows
without redoing the others (delete dp.json to redo them all).

Results: `benchmarks/results/dp.json` (the format of the DP issue), `dp.png`
(top-1 against ε) and `dp_ftrl.png` (both mechanisms against ε at δ = 1e-10).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import RESULTS, dp_ftrl, parse_config, same_setting, write_result
from benchmarks.quality import FederatedConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {"gboard": (1_000_000, 6_500), "mid": (100_000, 500)}


@dataclasses.dataclass
class DPBenchConfig(FederatedConfig):
    """The quality benchmark's federated setting from the pretrained model, over fewer rounds."""

    rounds: int = 100
    server_lr_decay_rounds: int = 70
    eval_every: int = 100
    noise_multipliers: str = "0.7,1.0"        # z of the projected rows
    mechanisms: str = "central,distributed"
    deployments: str = "gboard,mid"
    honest_z: float = 1.0
    initial_clip: float = 1.0                 # near the updates' median norm from pretrained (quality.json runs)
    ftrl_match_z: str = "1.0,0.7"             # DP-FTRL rows at the ε of DP-FedAvg at these z (benchmarks.dp_ftrl)
    ftrl_delta: float = 1e-10                 # δ of both mechanisms' ε in those rows
    ftrl_server_optimizer: str = ""           # the DP-FTRL rows' server step ("": the benchmark's)
    ftrl_server_lr: float = 0.0               # its rate (0: the benchmark's)
    rows: str = "all"                         # all | ftrl: only the DP-FTRL comparison, rerun (the rest kept)


def rows_of(cfg: DPBenchConfig) -> list[dict]:
    """Every DP row as (mechanism, z, population N, reports m, projection)."""
    out = [{"mechanism": mech, "noise_multiplier": float(z), "population": DEPLOYMENTS[d][0],
            "reports_per_round": DEPLOYMENTS[d][1], "projection": True}
           for d in cfg.deployments.split(",") for mech in cfg.mechanisms.split(",")
           for z in cfg.noise_multipliers.split(",")]
    return out + [{"mechanism": "central", "noise_multiplier": cfg.honest_z, "population": None,
                   "reports_per_round": cfg.clients_per_round, "projection": False}]


def row_name(row: dict) -> str:
    if "name" in row:                         # the DP-FTRL comparison's rows carry theirs
        return row["name"]
    scale = f"N{row['population']}_m{row['reports_per_round']}" if row["projection"] else "honest"
    return f"{row['mechanism']}_z{row['noise_multiplier']:g}_{scale}"


ROW_LISTS = ("noise_multipliers", "mechanisms", "deployments", "ftrl_match_z", "ftrl_delta", "ftrl_server_optimizer",
             "ftrl_server_lr", "rows")            # the DP-FTRL rows record and check theirs (dp_ftrl.keeps)


def reusable(cfg: DPBenchConfig, earlier: dict | None) -> dict:
    """The baseline and rows of an earlier dp.json that ran the same setting, by row name."""
    if not earlier or not same_setting(cfg, earlier.get("config"), ignore=ROW_LISTS):
        return {}
    named = {row_name(r): r for r in earlier.get("rows", [])}
    return {"baseline": earlier.get("baseline"), **named}


def run(cfg: DPBenchConfig, work: Path, earlier: dict | None = None, save=None) -> dict:
    """Baseline and every row; `save(report)` after each row, so a stopped run keeps what it did."""
    from models.corpus import load_corpus
    from models.model import GBOARD
    from models.pretrain import pretrain
    from models.simulate import run_simulation

    if cfg.rows not in ("all", "ftrl"):
        raise SystemExit("error: --rows must be 'all' or 'ftrl'")
    corpus = load_corpus(vocab_size=GBOARD.vocab_size - 4, seq_len=GBOARD.seq_len)
    initial = pretrain(GBOARD, corpus.vocab)[0]
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k in dataclasses.asdict(FederatedConfig())}
    base = FederatedConfig(**fields)
    old = reusable(cfg, earlier)
    if cfg.rows == "ftrl" and not old.get("baseline"):
        raise SystemExit("error: --rows ftrl keeps the other rows of dp.json, which holds none of this setting: "
                         "run every row first (make bench-dp)")

    def simulate(sim, name: str) -> dict:
        return run_simulation(corpus, GBOARD, sim, work / name, initial=initial)

    baseline = old.get("baseline") or simulate(base.simulation(), "baseline")["final"]
    rows: list[dict] = []
    for row in rows_of(cfg):
        if row_name(row) in old:
            rows.append(old[row_name(row)])
            print(f"{row_name(row)}: kept from dp.json", flush=True)
        elif cfg.rows == "all":
            rows.append(train_row(cfg, base, row, simulate))
            if save:
                save(report_of(cfg, baseline, rows, []))
    comparison = compare(cfg, base, rows, old, simulate,
                         lambda done: save and save(report_of(cfg, baseline, rows, done)))
    return report_of(cfg, baseline, rows, comparison)


def train_row(cfg: DPBenchConfig, base: FederatedConfig, row: dict, simulate) -> dict:
    """One projected or honest DP-FedAvg row (central or distributed) of the first part."""
    from contract.dp.noise import DPSpec

    clip_stddev = 0.05 * row["reports_per_round"]
    spec = DPSpec(mechanism=row["mechanism"], noise_multiplier=row["noise_multiplier"],
                  initial_clip=cfg.initial_clip, clipped_count_stddev=max(clip_stddev, row["noise_multiplier"]))
    sim = base.simulation(dp=spec, dp_population=row["population"],
                          dp_deploy_reports=row["reports_per_round"] if row["projection"] else None,
                          update=dataclasses.replace(base.simulation().update, weighting="uniform"))
    summary = simulate(sim, row_name(row))
    dp = summary["dp"]
    out = {**row, "population": dp["population"], "rounds": cfg.rounds, "epsilon": dp["epsilon"],
           "delta": dp["delta"], "accountant": dp["accountant"], "top1": summary["final"]["top1"],
           "top3": summary["final"]["top3"]}
    print(f"{row_name(row)}: top-1 {out['top1']:.4f}, ε {dp['epsilon']:.3g}", flush=True)
    return out


def compare(cfg: DPBenchConfig, base: FederatedConfig, rows: list[dict], old: dict, simulate, save) -> list[dict]:
    """The DP-FedAvg and DP-FTRL rows at the same ε (benchmarks.dp_ftrl), each deployment and z."""
    trained = {row_name(r): r for r in rows}
    out: list[dict] = []
    for _, n, m, z in dp_ftrl.plan(cfg, DEPLOYMENTS):
        fedavg_name, ftrl_name = dp_ftrl.names(cfg, n, m, z)
        central = trained.get(dp_ftrl.central_name(n, m, z)) or old.get(dp_ftrl.central_name(n, m, z))
        if central is None:
            central = train_row(cfg, base, {"mechanism": "central", "noise_multiplier": z, "population": n,
                                            "reports_per_round": m, "projection": True}, simulate)
        out.append(dp_ftrl.fedavg_row(cfg, fedavg_name, central, n, m, z))
        if cfg.rows == "all" and dp_ftrl.keeps(cfg, old.get(ftrl_name)):
            out.append(old[ftrl_name])
            print(f"{ftrl_name}: kept from dp.json", flush=True)
            continue
        summary = simulate(dp_ftrl.ftrl_sim(cfg, base, n, m, out[-1]["epsilon"]), ftrl_name)
        out.append(dp_ftrl.ftrl_row(cfg, ftrl_name, n, m, z, summary))
        print(f"{ftrl_name}: top-1 {out[-1]['top1']:.4f}, ε {out[-1]['epsilon']:.3g} (DP-FedAvg "
              f"{out[-2]['top1']:.4f} at ε {out[-2]['epsilon']:.3g})", flush=True)
        save(out)
    return out


def report_of(cfg: DPBenchConfig, baseline: dict, rows: list[dict], comparison: list[dict]) -> dict:
    legacy = [{**r, "assumption": r.get("assumption", "poisson")} for r in rows]
    return {"config": dataclasses.asdict(cfg), "baseline": {k: baseline[k] for k in ("top1", "top3")},
            "rows": legacy + comparison, "targets": targets(baseline, legacy),
            "ftrl_targets": dp_ftrl.targets(baseline, comparison, DEPLOYMENTS["gboard"][0])}


def targets(baseline: dict, rows: list[dict]) -> dict:
    """The issue's target at Gboard's scale: ε <= 2 at δ = N^-1.1 within 5% (relative) of the baseline."""
    gboard = [r for r in rows if r["projection"] and r["population"] == DEPLOYMENTS["gboard"][0]
              and "comparison" not in r]
    ok = [r for r in gboard if r["epsilon"] <= 2 and r["top1"] >= 0.95 * baseline["top1"]]
    goal = [r for r in gboard if r["epsilon"] <= 1 and r["top1"] >= 0.98 * baseline["top1"]]
    return {"met": bool(ok), "goal_met": bool(goal),
            "best": min(ok, key=lambda r: r["epsilon"], default=None)}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, keep in (("central, projected", lambda r: r["projection"] and r["mechanism"] == "central"),
                        ("distributed, projected", lambda r: r["projection"] and r["mechanism"] == "distributed"),
                        ("honest (this population)", lambda r: not r["projection"])):
        pts = sorted((r["epsilon"], r["top1"]) for r in report["rows"] if keep(r) and "comparison" not in r)
        if pts:
            ax.plot(*zip(*pts), "o", label=label)
    ax.axhline(report["baseline"]["top1"], color="grey", ls="--", label="non-private")
    ax.set_xscale("log"); ax.set_xlabel("ε (δ = N^-1.1)"); ax.set_ylabel("held-out top-1")
    ax.legend(); fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)


def main() -> None:
    from models.tff_runtime import install_exit_handlers

    install_exit_handlers()
    cfg, paths = parse_config(DPBenchConfig, __doc__, work_dir=REPO / "runs" / "bench-dp")
    path = RESULTS / "dp.json"
    report = run(cfg, paths["work_dir"], json.loads(path.read_text()) if path.is_file() else None,
                 save=lambda partial: write_result(path, partial, show=False))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(report, RESULTS / "dp.png")
    dp_ftrl.plot(report, RESULTS / "dp_ftrl.png")
    write_result(path, report)


if __name__ == "__main__":
    main()
