"""Choosing personalization's settings on training users only.

Every setting of contract.tasks.personal.PersonalSpec that decides what a
phone's personal model is — the cache's weight λ and smoothing κ, the
fallback's log-likelihood tolerance, fine-tuning's epochs and rate — is
chosen here, on the training users' own text, each user split exactly as
contract.tasks.personal.evaluate splits a phone's: the first
`adapt_fraction` adapts (its last `validation_fraction` decides the
fallback), the rest scores. `make bench-personalization` then measures the
chosen spec once, on the held-out users, which never reach this module
(tests/test_personalization.py checks that).

A grid of specs is scored without running `evaluate` once per spec: per user
and per fine-tuning setting, the plan computes the global and the fine-tuned
model's distributions on the held-back and the scored windows once, they are
reduced for the user's cache (contract.tasks.personal_cache.reduce), and
every λ, κ and tolerance is scored from those — the same arithmetic as
`evaluate` (tests/test_personalization.py checks equal counts).

The rule (`choose`): the largest mean relative gain of per-user top-1 among
the settings that hurt at most `Grid.max_hurt` of the users and keep the
worst decile at least as high as the global model's; the micro-averaged gain
breaks ties.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping

import numpy as np
from tqdm import tqdm

from contract.tasks.personal import PersonalCache, PersonalSpec, adapt, decide, split
from contract.tasks.personal_cache import plain_scores, positions, reduce, scores, softmax
from models.personalize import UserResult, report


@dataclasses.dataclass(frozen=True)
class Grid:
    """The settings tried (all combinations) and the constraint the chosen one must meet."""

    cache_weights: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
    smoothings: tuple[float, ...] = (1.0, 2.0, 4.0)
    fallback_nats: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 20.0)
    finetune: tuple[tuple[int, float], ...] = ((0, 0.0), (1, 0.05), (1, 0.2))   # (epochs, lr)
    max_hurt: float = 0.08         # below the 10%, for the step from training to held-out users

    def specs(self, base: PersonalSpec) -> list[PersonalSpec]:
        return [dataclasses.replace(base, epochs=e, lr=lr, cache_weight=w, cache_smoothing=k, fallback_nats=n)
                for (e, lr), w, k, n in itertools.product(self.finetune, self.cache_weights, self.smoothings,
                                                         self.fallback_nats)]


def _distributions(plan, flat: np.ndarray, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs [n, V], previous words, targets) of weights `flat` at the non-pad positions of `windows`."""
    mask, prev, targets = positions(windows)
    if not len(targets):
        return np.zeros((0, 0)), prev, targets
    plan.set_weights(flat)
    return softmax(plan.infer(np.asarray(windows)[:, :-1])[mask]), prev, targets


def _mixed(probs: np.ndarray, prev: np.ndarray, targets: np.ndarray, cache: PersonalCache):
    """A function (λ, κ) → (Hits, loglik) of these distributions mixed with `cache` (window_scores' numbers),
    each pair computed once."""
    plain = plain_scores(probs, targets)
    if not cache.total or not len(targets):
        return lambda lam, kappa: plain
    reduced = reduce(probs, prev, targets, cache)
    return functools.lru_cache(maxsize=None)(lambda lam, kappa: scores(reduced, lam, kappa) if lam else plain)


def user_results(plan, global_flat: np.ndarray, user: str, windows: np.ndarray, specs: list[PersonalSpec],
                 seed: int = 0) -> list[UserResult]:
    """What contract.tasks.personal.evaluate reports for this user under each spec of `specs` (sorted by
    epochs and lr; the split fractions and max_windows of the first hold for all)."""
    first = specs[0]
    adapt_part, scored = split(np.asarray(windows), first.adapt_fraction)
    recent = adapt_part[-first.max_windows:]
    fit, held = split(recent, 1 - first.validation_fraction)
    caches = PersonalCache.from_windows(fit), PersonalCache.from_windows(recent)
    global_on = _distributions(plan, global_flat, held), _distributions(plan, global_flat, scored)
    global_held, global_scored = plain_scores(*global_on[0][::2]), plain_scores(*global_on[1][::2])
    out = []
    for (epochs, lr), group in itertools.groupby(specs, key=lambda s: (s.epochs, s.lr)):
        tuned = dataclasses.replace(first, epochs=epochs, lr=lr)
        on = global_on
        if epochs and lr:
            on = (_distributions(plan, adapt(plan, global_flat, fit, tuned, seed)[0], held),
                  _distributions(plan, adapt(plan, global_flat, recent, tuned, seed)[0], scored))
        on_held, on_scored = _mixed(*on[0], caches[0]), _mixed(*on[1], caches[1])
        for spec in group:
            kept = global_held[0].positions > 0 and decide(
                global_held, on_held(spec.cache_weight, spec.cache_smoothing), spec)
            mine = on_scored(spec.cache_weight, spec.cache_smoothing)[0] if kept else global_scored[0]
            out.append(UserResult(user, len(windows), global_scored[0].top1, mine.top1,
                                  global_scored[0].positions, not kept, 0.0))
    plan.set_weights(global_flat)
    return out


def sweep(plan, global_flat: np.ndarray, users: Mapping[str, np.ndarray], specs: list[PersonalSpec],
          seed: int = 0, progress: bool = True) -> list[dict]:
    """The training-user report (models.personalize.report) of every spec, for `users` (≥ 2 windows each)."""
    specs = sorted(specs, key=lambda s: (s.epochs, s.lr))
    rows: list[list[UserResult]] = [[] for _ in specs]
    for user in tqdm(sorted(users), desc="choosing on training users", unit="user", disable=not progress):
        if len(users[user]) >= 2:
            for i, r in enumerate(user_results(plan, global_flat, user, users[user], specs, seed)):
                rows[i].append(r)
    return [{"spec": spec, **report(r)} for spec, r in zip(specs, rows)]


def choose(table: list[dict], max_hurt: float) -> dict:
    """The row of `table` the module docstring's rule picks (ValueError if none qualifies)."""
    ok = [r for r in table if r["hurt"] <= max_hurt and r["personal"]["worst_decile"] >= r["global"]["worst_decile"]]
    if not ok:
        raise ValueError(f"no setting hurts at most {max_hurt:.0%} of the training users")
    return max(ok, key=lambda r: (r["relative_gain"], r["micro_gain"]))
