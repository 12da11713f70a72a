"""Personalization evaluated in simulation: every held-out user, as its phone would do it.

The project's own loop over clients (rather than TFF's
`build_personalization_eval_computation`), because the phone's algorithm is
the one to measure: each user's windows go, in typing order, through
`contract.tasks.personal.evaluate` on the LiteRT training plan of the global
model — the same function, plan and arithmetic as a phone's personalization
evaluation task — so simulation and device agree exactly. What comes out:

* per user: hits of the global model and of what the phone would use
  (its personal model, or the global one after a fallback) on its last
  `1 − adapt_fraction` windows;
* the fairness report of both (contract.tasks.personal.fairness): mean, median,
  10th percentile and the fraction of users below half the mean, from
  per-user top-1; and the fractions of users helped and hurt, and the mean
  relative gain;
* a PNG of both per-user top-1 distributions (CDF).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from contract.tasks.personal import PersonalSpec, evaluate, fairness


@dataclasses.dataclass
class UserResult:
    user: str
    windows: int
    global_top1: int
    personal_top1: int
    positions: int
    fell_back: bool
    seconds: float


def evaluate_users(plan, global_flat: np.ndarray, users: dict[str, np.ndarray], spec: PersonalSpec,
                   seed: int = 0, progress: bool = True) -> list[UserResult]:
    """contract.tasks.personal.evaluate for every user with at least two windows (a loaded LiteRT plan)."""
    rows = []
    for user in tqdm(sorted(users), desc="personalization", unit="user", disable=not progress):
        windows = users[user]
        if len(windows) < 2:
            continue
        t0 = time.monotonic()
        report = evaluate(plan, global_flat, windows, spec, seed)
        rows.append(UserResult(user, len(windows), report.global_hits.top1, report.personal_hits.top1,
                               report.global_hits.positions, report.fell_back, time.monotonic() - t0))
    return rows


def worst_decile(per_user_top1: np.ndarray) -> float | None:
    """The mean top-1 of the tenth of users it serves worst (at least one user)."""
    v = np.sort(np.asarray(per_user_top1, np.float64))
    return float(v[:max(1, int(round(0.1 * len(v))))].mean()) if len(v) else None


def report(rows: list[UserResult]) -> dict:
    """The benchmark's figures from per-user results (benchmarks/results/personalization.json).

    relative_gain: of the mean per-user top-1 (personal over global, minus 1); micro_gain: the same of
    the top-1 over all positions pooled; worst_decile: each model's own worst tenth of users."""
    scored = [r for r in rows if r.positions]
    g = np.array([r.global_top1 / r.positions for r in scored])
    p = np.array([r.personal_top1 / r.positions for r in scored])
    positions = sum(r.positions for r in scored)
    glob, mine = fairness(g), fairness(p)
    g_hits, p_hits = sum(r.global_top1 for r in scored), sum(r.personal_top1 for r in scored)
    return {"users": len(scored), "positions": positions,
            "global": {**glob, "micro_top1": g_hits / max(positions, 1), "worst_decile": worst_decile(g)},
            "personal": {**mine, "micro_top1": p_hits / max(positions, 1), "worst_decile": worst_decile(p)},
            "relative_gain": (mine["top1"] / glob["top1"] - 1) if glob["top1"] else None,
            "micro_gain": (p_hits / g_hits - 1) if g_hits else None,
            "helped": float(np.mean(p > g)) if len(g) else None,
            "hurt": float(np.mean(p < g)) if len(g) else None,
            "fell_back": float(np.mean([r.fell_back for r in scored])) if scored else None}


def plot(rows: list[UserResult], path: Path, title: str = "") -> None:
    """Both per-user top-1 distributions as CDFs, with the global model's worst decile marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.positions]
    g = np.sort([r.global_top1 / r.positions for r in scored])
    p = np.sort([r.personal_top1 / r.positions for r in scored])
    y = np.arange(1, len(g) + 1) / max(len(g), 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.step(g, y, where="post", label=f"global (mean {g.mean():.1%})")
    ax.step(p, y, where="post", label=f"personal, after fallback (mean {p.mean():.1%})")
    ax.axhline(0.1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("per-user top-1 on the user's last 20% of text")
    ax.set_ylabel("fraction of users")
    ax.set_title(title or f"Personalization, {len(g)} held-out users")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
