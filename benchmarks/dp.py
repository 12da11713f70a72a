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

Rows already in dp.json from a run of the same setting (every field but the
row lists) keep their figures, and so does its baseline: a later run adds rows
without redoing the others (delete dp.json to redo them all).

Results: `benchmarks/results/dp.json` (the format of the DP issue) and
`dp.png` (top-1 against ε).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import RESULTS, parse_config, same_setting, write_result
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


def rows_of(cfg: DPBenchConfig) -> list[dict]:
    """Every DP row as (mechanism, z, population N, reports m, projection)."""
    out = [{"mechanism": mech, "noise_multiplier": float(z), "population": DEPLOYMENTS[d][0],
            "reports_per_round": DEPLOYMENTS[d][1], "projection": True}
           for d in cfg.deployments.split(",") for mech in cfg.mechanisms.split(",")
           for z in cfg.noise_multipliers.split(",")]
    return out + [{"mechanism": "central", "noise_multiplier": cfg.honest_z, "population": None,
                   "reports_per_round": cfg.clients_per_round, "projection": False}]


def row_name(row: dict) -> str:
    scale = f"N{row['population']}_m{row['reports_per_round']}" if row["projection"] else "honest"
    return f"{row['mechanism']}_z{row['noise_multiplier']:g}_{scale}"


ROW_LISTS = ("noise_multipliers", "mechanisms", "deployments")


def reusable(cfg: DPBenchConfig, earlier: dict | None) -> dict:
    """The baseline and rows of an earlier dp.json that ran the same setting, by row name."""
    if not earlier or not same_setting(cfg, earlier.get("config"), ignore=ROW_LISTS):
        return {}
    named = {row_name(r): r for r in earlier.get("rows", [])}
    return {"baseline": earlier.get("baseline"), **named}


def run(cfg: DPBenchConfig, work: Path, earlier: dict | None = None, save=None) -> dict:
    """Baseline and every row; `save(report)` after each row, so a stopped run keeps what it did."""
    from contract.dp.noise import DPSpec
    from models.corpus import load_corpus
    from models.model import GBOARD
    from models.pretrain import pretrain
    from models.simulate import run_simulation

    corpus = load_corpus(vocab_size=GBOARD.vocab_size - 4, seq_len=GBOARD.seq_len)
    initial = pretrain(GBOARD, corpus.vocab)[0]
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k in dataclasses.asdict(FederatedConfig())}
    base = FederatedConfig(**fields)
    old = reusable(cfg, earlier)
    baseline = old.get("baseline") or run_simulation(corpus, GBOARD, base.simulation(), work / "baseline",
                                                     initial=initial)["final"]
    rows = []
    for row in rows_of(cfg):
        if row_name(row) in old:
            rows.append(old[row_name(row)])
            print(f"{row_name(row)}: kept from dp.json", flush=True)
            continue
        clip_stddev = 0.05 * row["reports_per_round"]
        spec = DPSpec(mechanism=row["mechanism"], noise_multiplier=row["noise_multiplier"],
                      initial_clip=cfg.initial_clip, clipped_count_stddev=max(clip_stddev, row["noise_multiplier"]))
        sim = base.simulation(dp=spec, dp_population=row["population"],
                              dp_deploy_reports=row["reports_per_round"] if row["projection"] else None,
                              update=dataclasses.replace(base.simulation().update, weighting="uniform"))
        summary = run_simulation(corpus, GBOARD, sim, work / row_name(row), initial=initial)
        dp = summary["dp"]
        rows.append({**row, "population": dp["population"], "rounds": cfg.rounds, "epsilon": dp["epsilon"],
                     "delta": dp["delta"], "accountant": dp["accountant"], "top1": summary["final"]["top1"],
                     "top3": summary["final"]["top3"]})
        print(f"{row_name(row)}: top-1 {rows[-1]['top1']:.4f}, ε {dp['epsilon']:.3g}", flush=True)
        if save:
            save(report_of(cfg, baseline, rows))
    return report_of(cfg, baseline, rows)


def report_of(cfg: DPBenchConfig, baseline: dict, rows: list[dict]) -> dict:
    return {"config": dataclasses.asdict(cfg), "baseline": {k: baseline[k] for k in ("top1", "top3")},
            "rows": rows, "targets": targets(baseline, rows)}


def targets(baseline: dict, rows: list[dict]) -> dict:
    """The issue's target at Gboard's scale: ε <= 2 at δ = N^-1.1 within 5% (relative) of the baseline."""
    gboard = [r for r in rows if r["projection"] and r["population"] == DEPLOYMENTS["gboard"][0]]
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
        pts = sorted((r["epsilon"], r["top1"]) for r in report["rows"] if keep(r))
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
    write_result(path, report)


if __name__ == "__main__":
    main()
