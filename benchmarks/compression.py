"""Compression benchmark: what 32, 8 and 4 bits per value cost in quality, and save in bytes.

`make bench-compression` runs the same reduced federated configuration
(Gboard-size model, the quality benchmark's client and server settings, fewer
rounds), from the same seed, once per update spec — float32, 8 bits, and
4 bits with the Hadamard rotation; the clip and the weight cap are the
population defaults in all three, so only the bits differ — and reports for
each the held-out top-1 and top-3 (`contract.model.metrics`, every held-out window),
the upload per device and round (the encoded body's bytes, as a phone sends
it), and the time a device spends encoding (`contract.update.pipeline`, on this CPU).
It then reruns the server benchmark's ingest measurement (benchmarks.server:
1 round of HTTP uploads to the real server under gunicorn) with float32 and
8-bit updates, in the same run. Results: `benchmarks/results/compression.json`
and `compression.png` (training loss per round, top-1 against upload size).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import RESULTS, parse_config, write_result
from benchmarks.quality import FederatedConfig

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"f32": {"bits": 32, "rotation": False}, "q8": {"bits": 8, "rotation": False},
            "q4": {"bits": 4, "rotation": True}}
TARGETS = {"q8_top1_points": 0.1, "q4_top1_points": 0.3, "q8_upload_mb": 1.45, "q4_upload_mb": 0.75,
           "ingest_ratio": 3.0}


@dataclasses.dataclass
class CompressionConfig(FederatedConfig):
    """The quality benchmark's federated setting, over fewer rounds."""

    rounds: int = 150
    server_lr_decay_rounds: int = 100
    eval_every: int = 150
    ingest_reports: int = 300


def simulate(cfg: CompressionConfig, corpus, name: str, work: Path, reuse: bool = False) -> dict:
    """One variant's run (or, with `reuse`, the finished run already in `work` with this very config)."""
    from contract.update.spec import UpdateSpec
    from models.model import GBOARD
    from models.simulate import run_simulation

    spec = UpdateSpec(**VARIANTS[name]).scaled_to_epochs(cfg.local_epochs)
    sim = cfg.simulation(update=spec)
    done = work / name / "summary.json"
    if reuse and done.is_file() and json.loads(done.read_text())["simulation"] == json.loads(
            json.dumps(dataclasses.asdict(sim))):
        summary = json.loads(done.read_text())
        print(f"[{name}] reusing the finished run in {work / name}", flush=True)
    else:
        summary = run_simulation(corpus, GBOARD, sim, work / name)
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if "train" in r and r["clients"]]
    encode_ms = 1000 * sum(r["encode_s"] for r in rounds) / sum(r["clients"] for r in rounds)
    clipped = sum(r["clipped"] for r in rounds) / sum(r["clients"] for r in rounds)
    return {"bits": spec.bits, "rotation": spec.rotation, "top1": summary["final"]["top1"],
            "top3": summary["final"]["top3"], "loss": summary["final"]["loss"],
            "upload_bytes": int(round(summary["upload_bytes_per_client"])),
            "encode_ms": round(encode_ms, 1), "clipped_fraction": round(clipped, 4),
            "clip_norm": spec.clip_norm, "max_weight": spec.max_weight,
            "train_loss": [r["train"]["loss"] for r in rounds], "wall_s": round(summary["wall_s"], 1)}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, v in report["variants"].items():
        ax1.plot(range(1, len(v["train_loss"]) + 1), v["train_loss"], label=f"{name} ({v['bits']} bits{', rotated' if v['rotation'] else ''})",
                 lw=1)
        ax2.scatter(v["upload_bytes"] / 1e6, 100 * v["top1"], s=60)
        ax2.annotate(name, (v["upload_bytes"] / 1e6, 100 * v["top1"]), textcoords="offset points",
                     xytext=(6, 4))
    ax1.set_xlabel("round"); ax1.set_ylabel("client training loss"); ax1.legend()
    ax2.set_xlabel("upload per device and round (MB)"); ax2.set_ylabel("held-out top-1 (%)")
    ax2.set_xlim(left=0)
    fig.suptitle(f"Update compression, Gboard model, {report['rounds']} rounds × "
                 f"{report['config']['clients_per_round']} clients (same seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdicts(report: dict) -> dict:
    v, ingest = report["variants"], report["ingest_updates_per_s"]
    points = {k: 100 * (v["f32"]["top1"] - v[k]["top1"]) for k in ("q8", "q4")}
    ratio = ingest["q8"] / ingest["f32"]
    return {
        "q8_top1_points_below_f32": round(points["q8"], 3),
        "q4_top1_points_below_f32": round(points["q4"], 3),
        "ingest_ratio_q8_over_f32": round(ratio, 2),
        "met": {"q8_quality": points["q8"] <= TARGETS["q8_top1_points"],
                "q4_quality": points["q4"] <= TARGETS["q4_top1_points"],
                "q8_upload": v["q8"]["upload_bytes"] <= TARGETS["q8_upload_mb"] * 1e6,
                "q4_upload": v["q4"]["upload_bytes"] <= TARGETS["q4_upload_mb"] * 1e6,
                "ingest": ratio >= TARGETS["ingest_ratio"]},
    }


def table(report: dict) -> str:
    lines = ["| variant | bits | rotation | top-1 | top-3 | upload / device / round | encode (device) |",
             "|---|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        lines.append(f"| {name} | {v['bits']} | {'yes' if v['rotation'] else 'no'} | {v['top1']:.2%} | "
                     f"{v['top3']:.2%} | {v['upload_bytes'] / 1e6:.3f} MB | {v['encode_ms']:.0f} ms |")
    i, verdict = report["ingest_updates_per_s"], report["verdicts"]
    lines.append("")
    lines.append(f"HTTP ingest (real server, gunicorn, loopback): float32 {i['f32']:.1f} updates/s, "
                 f"8-bit {i['q8']:.1f} updates/s ({verdict['ingest_ratio_q8_over_f32']:.2f}x).")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.server import BenchConfig, serve_and_measure
    from models.corpus import load_corpus
    from models.model import GBOARD
    from models.tff_runtime import install_exit_handlers

    install_exit_handlers()
    cfg, chosen = parse_config(CompressionConfig, __doc__, switches={
        "reuse_runs": "reuse finished runs in --work-dir made with the same settings (e.g. to redo the ingest)"},
        work_dir=REPO / "runs" / "bench-compression")
    work, reuse = chosen["work_dir"], chosen["reuse_runs"]
    start = time.monotonic()
    corpus = load_corpus(vocab_size=GBOARD.vocab_size - 4, seq_len=GBOARD.seq_len)
    variants = {}
    for name in VARIANTS:
        print(f"[{name}] {VARIANTS[name]}, {cfg.rounds} rounds", flush=True)
        variants[name] = simulate(cfg, corpus, name, work, reuse)
        print(f"[{name}] top-1 {variants[name]['top1']:.4f}, upload {variants[name]['upload_bytes']:,} B, "
              f"encode {variants[name]['encode_ms']:.0f} ms", flush=True)
    measured = serve_and_measure(BenchConfig(reports=cfg.ingest_reports), specs=("f32", "q8"),
                                 checkins=False)["ingest"]
    report = {"model": "gboard", "rounds": cfg.rounds, "variants": variants,
              "ingest_updates_per_s": {k: round(v["per_s"], 2) for k, v in measured.items()},
              "config": dataclasses.asdict(cfg), "targets": TARGETS,
              "wall_s": round(time.monotonic() - start, 1)}
    report["verdicts"] = verdicts(report)
    plot(report, RESULTS / "compression.png")
    write_result(RESULTS / "compression.json", report, show=False)
    print(table(report))
    print(json.dumps(report["verdicts"], indent=2))
    print(f"wall time {report['wall_s'] / 60:.1f} min; wrote benchmarks/results/compression.json and "
          "compression.png")


if __name__ == "__main__":
    main()
