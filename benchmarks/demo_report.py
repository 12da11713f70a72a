"""The demo's results: held-out quality of the server's model versions, a table, two PNGs.

Quality is measured the one way every Nightjar number is (`contract.model.metrics`
through `models.central.evaluate`), on a fixed, seeded sample of the windows
of the held-out clients — people whose text no phone in the fleet typed.
"""
from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np


def heldout_sample(corpus, n: int, seed: int, vocab=None) -> np.ndarray:
    """`n` windows drawn without replacement (seeded) from all held-out clients' windows, encoded
    with `vocab` (default: the corpus'): the same positions whatever the vocabulary."""
    from contract.model.text import to_sequences

    if vocab is None:
        windows = np.concatenate([corpus.heldout[c] for c in sorted(corpus.heldout)])
    else:
        windows = np.concatenate([to_sequences(corpus.heldout_texts[c], vocab, corpus.seq_len)
                                  for c in sorted(corpus.heldout)])
    if n >= len(windows):
        return windows
    return windows[np.sort(np.random.default_rng(seed).permutation(len(windows))[:n])]


def evaluate_versions(server, status, model, corpus, n_windows: int,
                      scratch: Path, seed: int = 0, every: int = 5) -> dict:
    """Held-out metrics of the initial version, every `every`-th version, every published one
    and the last one; checkpoints are fetched from `server` (an emulation ServerProcess) by hash,
    as the operator (unpublished ones are not public)."""
    from contract.model.text import Vocabulary
    from models.central import evaluate
    from contract.model.weights import load_checkpoint

    windows = heldout_sample(corpus, n_windows, seed)
    by_vocab = {corpus.vocab.sha256: windows}      # a version with discovered words: its own vocabulary
    versions = sorted(status.versions, key=lambda v: v["version"])
    last = versions[-1]["version"]
    chosen = [v for v in versions
              if v["version"] in (0, last) or v["version"] % every == 0 or v.get("published_at")]
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in chosen:
        path = scratch / f"v{v['version']}.safetensors"
        path.write_bytes(server.operator_get(f"/v1/artifacts/{v['checkpoint_sha256']}").content)
        _, flat, _ = load_checkpoint(path)
        sha = v.get("vocab_sha256") or corpus.vocab.sha256
        if sha not in by_vocab:
            vocab = Vocabulary.from_json(server.operator_get(f"/v1/artifacts/{sha}").content.decode("utf-8"))
            by_vocab[sha] = heldout_sample(corpus, n_windows, seed, vocab)
        t0 = time.monotonic()
        heldout = evaluate(model.config, flat, by_vocab[sha]).as_dict()
        print(f"  version {v['version']:>3}: held-out top-1 {heldout['top1']:.2%}  top-3 "
              f"{heldout['top3']:.2%}  ({time.monotonic() - t0:.0f} s)", flush=True)
        rows.append({"version": v["version"], "round": v["round"], "published": v.get("published_at") is not None,
                     "heldout": {k: round(heldout[k], 5) for k in ("top1", "top3", "loss")},
                     "on_device_eval": ({k: v["eval"][k] for k in ("top1", "top3", "positions")}
                                        if v.get("eval") else None),
                     "dp": v.get("dp")})
    return {"windows": len(windows), "clients": len(corpus.heldout), "versions": rows,
            "train_loss": [(v["version"], v["train"]["loss"]) for v in versions
                           if v.get("train") and "loss" in v["train"]]}


def summary_table(quality: dict) -> str:
    lines = [f"held-out quality ({quality['windows']:,} windows sampled from the {quality['clients']} "
             f"held-out clients; contract.model.metrics):",
             f"{'version':>8} {'top-1':>7} {'top-3':>7} {'loss':>6}  {'on-device eval top-3':>20}  "
             f"{'ε (DP)':>9}  published"]
    for q in quality["versions"]:
        name = "initial" if q["version"] == 0 else str(q["version"])
        ev = format(q["on_device_eval"]["top3"], ".2%") if q["on_device_eval"] else "-"
        dp = q.get("dp")
        eps = "-" if not dp else ("inf" if dp["epsilon"] is None else format(dp["epsilon"], ".3g"))
        lines.append(f"{name:>8} {q['heldout']['top1']:>7.2%} {q['heldout']['top3']:>7.2%} "
                     f"{q['heldout']['loss']:>6.2f}  "
                     f"{ev:>20}  {eps:>9}  {'yes' if q['published'] else ''}")
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_quality(quality: dict, path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = quality["versions"]
    x = [q["version"] for q in rows]
    ax1.plot(x, [q["heldout"]["top1"] for q in rows], "o-", label="held-out top-1")
    ax1.plot(x, [q["heldout"]["top3"] for q in rows], "o-", label="held-out top-3")
    ev = [(q["version"], q["on_device_eval"]["top3"]) for q in rows if q["on_device_eval"]]
    if ev:
        ax1.plot(*zip(*ev), "s--", alpha=0.6, label="on-device eval top-3 (phones' own text)")
    pub = [q for q in rows if q["published"]]
    ax1.plot([q["version"] for q in pub], [q["heldout"]["top3"] for q in pub], "*", markersize=16,
             color="gold", markeredgecolor="black", label="published to apps")
    ax1.set_xlabel("model version (= completed training rounds)")
    ax1.set_ylabel("fraction of positions")
    ax1.legend(fontsize=8)
    ax1.set_title("quality per version")
    if quality["train_loss"]:
        ax2.plot(*zip(*quality["train_loss"]), ".-")
    ax2.plot(x, [q["heldout"]["loss"] for q in rows], "o-", label="held-out")
    ax2.set_xlabel("model version")
    ax2.set_ylabel("cross-entropy")
    ax2.legend(["phones' training loss (round mean)", "held-out"], fontsize=8)
    ax2.set_title("loss per round")
    fig.suptitle("Nightjar demo: federated training by the emulated fleet")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_participation(rounds: list[dict], hourly: dict[int, collections.Counter], path: Path,
                       zones: int) -> None:
    """Per simulated UTC hour: what the phones did (top) and what the server recorded (bottom)."""
    plt = _plt()
    outcomes: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rounds:
        for dev in r.get("devices", []):
            label = dev["outcome"]
            if label == "failed":
                label = "failed: " + (dev["reason"] or "unknown").split(":")[0]
            outcomes[int(dev["assigned_at"] // 3600)][label] += 1
    hours = sorted(set(hourly) | set(outcomes))
    if not hours:
        return
    x = np.arange(len(hours))
    labels = [time.strftime("%a %Hh", time.gmtime(h * 3600)) for h in hours]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    series = {"checked in, assigned": "checkin/assigned", "checked in, rejected": "checkin/rejected",
              "woke up, not eligible": "policy/not_eligible"}
    for name, key in series.items():
        ax1.plot(x, [hourly.get(h, {}).get(key, 0) for h in hours], ".-", label=name)
    ax1.set_ylabel("phone wake-ups")
    ax1.legend(fontsize=8)
    ax1.set_title(f"what the phones did, per simulated hour (UTC; phones in {zones} time zones)")
    kinds = sorted({k for c in outcomes.values() for k in c})
    bottom = np.zeros(len(hours))
    for kind in kinds:
        values = np.array([outcomes.get(h, {}).get(kind, 0) for h in hours])
        ax2.bar(x, values, bottom=bottom, label=kind)
        bottom += values
    ax2.set_ylim(0, max(bottom.max(), 1) * 1.08)
    ax2.set_ylabel("sessions")
    ax2.legend(fontsize=8)
    ax2.set_title("participation recorded by the server (each selected phone's outcome)")
    step = max(1, len(hours) // 16)
    ax2.set_xticks(x[::step], labels[::step], rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
