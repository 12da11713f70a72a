"""The privacy ledger: DP-FedAvg's per-round parameters, its events, and (ε, δ) per model version.

It owns the `dp_events` and `dp_spent` tables. A population with
`[populations.<name>.dp]` trains every round under user-level DP
(contract.dp.noise):

* `bind`, when a training round opens: the round's clip (the adaptive clip
  after the last recorded round, or the initial one), the noise's standard
  deviation on the sum and the fixed denominator, which go into the round's
  update spec; and the budget check: a round whose event would take ε past
  `dp_budget.epsilon` is refused (`BudgetExhausted`), so it never opens;
* `record`, when it completes: the next clip from the noised count of
  unclipped updates, the round's event (mechanism, noise multiplier,
  expected reports over the population's size, min-separation, reports)
  and the (ε, δ) of the version it made, composed over every event the
  population has recorded so far (privacy.accounting), in the same
  transaction as the version;
* `publishable`: a version whose ε exceeds the budget is never published.

δ is the budget's, or N^-1.1 for a population of N devices when no budget is
set. What the figure assumes is in server/README.md, "Differential privacy".
"""
from __future__ import annotations

import dataclasses
import math
import threading

from contract.dp.noise import adapt_clip
from privacy.accounting import Event, Spent, distributed_noise_multiplier, epsilon
from server.config import PopulationConfig
from server.store import Store, Tx


def _finite(spent: dict) -> dict:
    """JSON has no infinity: ε of a noise-free "DP" setting (z = 0) is reported as null."""
    return {**spent, "epsilon": spent["epsilon"] if math.isfinite(spent["epsilon"]) else None}


class BudgetExhausted(Exception):
    """The next training round would spend more than the population's budget."""

    def __init__(self, population: str, spent: Spent, budget: float):
        self.spent = spent
        super().__init__(f"population {population!r}: one more training round would spend "
                         f"ε = {spent.epsilon:.4g} (δ = {spent.delta:.3g}), over its budget of {budget:g}")


@dataclasses.dataclass(frozen=True)
class RoundDP:
    """What a DP training round is bound to (goes into its update spec)."""

    mechanism: str
    clip: float
    stddev: float           # of the noise on the sum of clipped updates: z_v · clip
    denominator: int        # the expected reports
    count_stddev: float     # σ_b, on the count of unclipped updates

    @property
    def bound(self) -> tuple:
        """What contract.update.spec.UpdateSpec.bind takes as `dp`."""
        return (self.mechanism, self.stddev, self.denominator, self.count_stddev)


def delta_for(cfg: PopulationConfig, population_size: int) -> float:
    if cfg.dp_budget is not None:
        return cfg.dp_budget.delta
    return max(1, population_size) ** -1.1


class PrivacyLedger:
    def __init__(self, store: Store, population_size):
        self._store = store
        self._population_size = population_size        # population -> enrolled (unrevoked) devices
        self._refusals: dict[tuple, Spent] = {}
        self._lock = threading.Lock()

    # -- opening a round ------------------------------------------------------------------------

    def bind(self, tx: Tx, population: str, cfg: PopulationConfig) -> RoundDP:
        """The DP parameters of the training round about to open; BudgetExhausted if it may not."""
        spec = cfg.dp
        expected = cfg.goal
        z_values, _ = spec.split(expected)
        last = tx.execute("SELECT next_clip FROM dp_events WHERE population = ? ORDER BY round_number DESC"
                          " LIMIT 1", (population,)).fetchone()
        clip = last[0] if last else spec.initial_clip
        if cfg.dp_budget is not None:
            size = self._population_size(population)
            planned = Event(spec.mechanism, spec.noise_multiplier, expected / max(1, size))
            events = self.events(tx, population)
            key = (population, len(events), planned.rounded(), cfg.dp_budget)
            with self._lock:
                spent = self._refusals.get(key)
            if spent is None:
                spent = epsilon([*events, planned], delta_for(cfg, size))
                with self._lock:
                    self._refusals = {k: v for k, v in self._refusals.items() if k[0] != population or k[1] >= len(events)}
                    self._refusals[key] = spent
            if spent.epsilon > cfg.dp_budget.epsilon:
                raise BudgetExhausted(population, spent, cfg.dp_budget.epsilon)
        _, count_stddev = spec.split(expected)
        return RoundDP(spec.mechanism, float(clip), z_values * float(clip), expected, count_stddev)

    # -- closing it -----------------------------------------------------------------------------

    def record(self, tx: Tx, population: str, round_id: int, round_number: int,
               version: int | None, round_spec, reports: int, unclipped: float, cfg: PopulationConfig,
               now: float) -> Spent:
        """Record a completed DP round (inside the caller's transaction); the (ε, δ) after it.

        `round_spec` is the round's contract.update.spec.RoundSpec; under distributed DP its noise
        multiplier is the one the `reports` devices that were summed actually added."""
        spec = cfg.dp
        size = self._population_size(population)
        clip = round_spec.spec.clip_norm
        distributed = round_spec.dp_mechanism == "distributed"
        nxt = adapt_clip(clip, unclipped, reports, cfg.goal, spec, noised=distributed)
        z = distributed_noise_multiplier(round_spec, reports) if distributed else spec.noise_multiplier
        q = min(1.0, cfg.goal / max(1, size))
        tx.execute("INSERT INTO dp_events (population, round_id, round_number, version, mechanism,"
                   " noise_multiplier, expected_reports, population_size, sampling_probability,"
                   " min_separation_s, reports, clip, next_clip, recorded_at)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (population, round_id, round_number, version, spec.mechanism, z,
                    cfg.goal, size, q, cfg.eligibility.min_separation_s, reports, clip, nxt, now))
        spent = epsilon(self.events(tx, population), delta_for(cfg, size))
        if version is not None:
            tx.execute("INSERT INTO dp_spent (population, version, epsilon, delta, accountant,"
                       " rounds) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (population, version) DO UPDATE SET"
                       " epsilon = excluded.epsilon, delta = excluded.delta, accountant = excluded.accountant,"
                       " rounds = excluded.rounds", (population, version, spent.epsilon, spent.delta,
                                                              spent.accountant, spent.rounds))
        return spent

    # -- reading --------------------------------------------------------------------------------

    @staticmethod
    def events(conn: Tx, population: str) -> list[Event]:
        return [Event(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT mechanism, noise_multiplier, sampling_probability FROM dp_events WHERE population = ?"
            " ORDER BY round_number", (population,))]

    def spent(self, population: str, version: int, conn: Tx | None = None) -> dict | None:
        """The (ε, δ) a version carries, or None (made without DP)."""
        conn = conn or self._store.connection()
        row = conn.execute("SELECT epsilon, delta, accountant, rounds FROM dp_spent WHERE population = ?"
                           " AND version = ?", (population, version)).fetchone()
        return _finite(dict(epsilon=row[0], delta=row[1], accountant=row[2], rounds=row[3])) if row else None

    def publishable(self, conn: Tx, population: str, version: int,
                    cfg: PopulationConfig) -> bool:
        """False for a version beyond the budget (a distributed round with dropouts can get there)."""
        if cfg.dp_budget is None:
            return True
        spent = self.spent(population, version, conn)
        return spent is None or (spent["epsilon"] is not None and spent["epsilon"] <= cfg.dp_budget.epsilon)

    def summary(self, population: str, cfg: PopulationConfig) -> dict | None:
        """The ledger as the operator sees it: the setting, the clip, what was spent, the budget."""
        if cfg.dp is None:
            return None
        conn = self._store.connection()
        rows = conn.execute("SELECT round_number, version, mechanism, noise_multiplier, expected_reports,"
                            " population_size, sampling_probability, min_separation_s, reports, clip, next_clip"
                            " FROM dp_events WHERE population = ? ORDER BY round_number", (population,)).fetchall()
        last = conn.execute("SELECT version, epsilon, delta, accountant, rounds FROM dp_spent WHERE population = ?"
                            " ORDER BY version DESC LIMIT 1", (population,)).fetchone()
        return {"dp": dataclasses.asdict(cfg.dp),
                "budget": dataclasses.asdict(cfg.dp_budget) if cfg.dp_budget else None,
                "clip": rows[-1]["next_clip"] if rows else cfg.dp.initial_clip,
                "rounds": len(rows),
                "spent": _finite(dict(last)) if last else None,
                "events": [dict(r) for r in rows[-50:]]}
