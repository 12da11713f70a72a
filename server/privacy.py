"""The privacy ledger: each DP training round's parameters, its events, and (ε, δ) per model version.

It owns the `dp_events`, `dp_spent`, `dp_participation` and `dp_refusals`
tables. A population with `[populations.<name>.dp]` trains every round under
user-level DP (contract.dp), by one of two accountings:

* **DP-FedAvg** (`central`, `distributed`): each round is a Gaussian
  mechanism on a cohort modelled as Poisson sampling of the enrolled devices
  with probability goal/N (privacy.accounting). Phones choose when they
  check in, so that model is an approximation: versions carry the
  assumption "poisson".
* **DP-FTRL** (`ftrl`): the server adds tree-correlated noise
  (contract.dp.ftrl), regenerated from a secret key and the round's DP index,
  and its guarantee needs no sampling, only the participation rule this
  ledger enforces at selection (`admits`): a device is never selected into a
  DP round within `min_separation_rounds` (b) DP rounds of its last one, nor
  more than `max_participations` (k) times in an accounting horizon of
  `horizon_rounds`. ε comes from the tree's sensitivity under that rule
  (privacy.ftrl): assumption "participation". Indices count *released*
  rounds only: a round that released nothing leaves its index to the next.

The ledger's steps: `bind`, when a training round opens — its clip (the
adaptive clip after the last recorded round, or the initial one), the noise
on the sum and the fixed denominator, which go into the round's update spec,
and the budget check (a round whose event would take ε past `dp_budget`
is refused: `BudgetExhausted`); `record`, when it completes — the next clip
from the noised count of unclipped updates, the event, the participations,
and the (ε, δ) of the version it made, in the same transaction;
`publishable` — a version whose ε exceeds the budget is never published.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Iterable

from contract.dp.noise import adapt_clip
from privacy.accounting import Event, Spent, distributed_noise_multiplier, epsilon
from privacy.ftrl import choose_restart, ftrl_spent
from server.config import PopulationConfig
from server.store import Store, Tx

FTRL, PARTICIPATION_REFUSAL = "ftrl", "participation_limit"


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
    stddev: float           # of the noise on the sum of clipped updates: z_v · clip (per tree node under ftrl)
    denominator: int        # the expected reports
    count_stddev: float     # σ_b, on the count of unclipped updates

    @property
    def bound(self) -> tuple:
        """What contract.update.spec.UpdateSpec.bind takes as `dp`."""
        return (self.mechanism, self.stddev, self.denominator, self.count_stddev)


@dataclasses.dataclass(frozen=True)
class Participation:
    """DP-FTRL's layout for a population: horizon n, separation b, at most k per horizon, tree restarts."""

    horizon: int
    b: int
    k: int
    restart_every: int


@functools.lru_cache(maxsize=32)
def _restart(horizon: int, k: int, b: int) -> int:
    return choose_restart(horizon, k, b)


def participation(cfg: PopulationConfig) -> Participation:
    dp = cfg.dp
    return Participation(dp.horizon_rounds, dp.min_separation_rounds, dp.max_participations,
                         dp.restart_every or _restart(dp.horizon_rounds, dp.max_participations,
                                                      dp.min_separation_rounds))


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
        z_values, count_stddev = spec.split(cfg.goal)
        last = tx.execute("SELECT next_clip FROM dp_events WHERE population = ? ORDER BY round_number DESC"
                          " LIMIT 1", (population,)).fetchone()
        clip = last[0] if last else spec.initial_clip
        if cfg.dp_budget is not None:
            spent = self._planned(tx, population, cfg)
            if spent.epsilon > cfg.dp_budget.epsilon:
                raise BudgetExhausted(population, spent, cfg.dp_budget.epsilon)
        return RoundDP(spec.mechanism, float(clip), z_values * float(clip), cfg.goal, count_stddev)

    def _planned(self, tx: Tx, population: str, cfg: PopulationConfig) -> Spent:
        """What one more round of the configured mechanism would bring the population's ε to."""
        size = self._population_size(population)
        events = self.events(tx, population)
        planned = Event(cfg.dp.mechanism, cfg.dp.noise_multiplier, cfg.goal / max(1, size))
        key = (population, len(events), self.released(tx, population), planned.rounded(), cfg.dp_budget)
        with self._lock:
            spent = self._refusals.get(key)
        if spent is None:
            if cfg.dp.mechanism == FTRL:
                spent = self._spent(tx, population, cfg, extra_ftrl=1)
            else:
                spent = epsilon([*events, planned], delta_for(cfg, size))
            with self._lock:
                self._refusals = {k: v for k, v in self._refusals.items() if k[0] != population or k[1] >= len(events)}
                self._refusals[key] = spent
        return spent

    # -- DP-FTRL's participation rule -------------------------------------------------------------

    @staticmethod
    def released(conn: Tx, population: str) -> int:
        """DP-FTRL rounds released so far: the next one's index."""
        return conn.execute("SELECT COUNT(*) FROM dp_events WHERE population = ? AND mechanism = ?"
                            " AND version IS NOT NULL", (population, FTRL)).fetchone()[0]

    def admits(self, tx: Tx, population: str, device_id: str, cfg: PopulationConfig) -> str | None:
        """None if the device may be selected into the next DP-FTRL round, else why not (counted)."""
        layout, index = participation(cfg), self.released(tx, population)
        row = tx.execute("SELECT horizon, count, last_index FROM dp_participation WHERE population = ? AND"
                         " device_id = ?", (population, device_id)).fetchone()
        refused = row is not None and (row["last_index"] > index - layout.b or (
            row["horizon"] == index // layout.horizon and row["count"] >= layout.k))
        tx.execute("INSERT INTO dp_refusals (population, refused, checkins) VALUES (?, ?, 1) ON CONFLICT"
                   " (population) DO UPDATE SET refused = dp_refusals.refused + excluded.refused,"
                   " checkins = dp_refusals.checkins + 1", (population, int(refused)))
        return PARTICIPATION_REFUSAL if refused else None

    def _took_part(self, tx: Tx, population: str, devices: Iterable[str], index: int, horizon: int) -> None:
        h = index // horizon
        tx.executemany("INSERT INTO dp_participation (population, device_id, horizon, count, last_index)"
                       " VALUES (?, ?, ?, 1, ?) ON CONFLICT (population, device_id) DO UPDATE SET"
                       " count = CASE WHEN dp_participation.horizon = excluded.horizon"
                       " THEN dp_participation.count + 1 ELSE 1 END,"
                       " horizon = excluded.horizon, last_index = excluded.last_index",
                       [(population, d, h, index) for d in devices])

    # -- closing it -----------------------------------------------------------------------------

    def record(self, tx: Tx, population: str, round_id: int, round_number: int, version: int | None, round_spec,
               reports: int, unclipped: float, cfg: PopulationConfig, now: float,
               participants: Iterable[str] = ()) -> Spent | None:
        """Record a completed DP round (inside the caller's transaction); the (ε, δ) after it.

        `round_spec` is the round's contract.update.spec.RoundSpec; under distributed DP its noise
        multiplier is the one the `reports` devices that were summed actually added. A DP-FTRL round
        that released nothing (`version` None) records nothing: its index goes to the next round."""
        spec = cfg.dp
        ftrl = round_spec.dp_mechanism == FTRL
        if ftrl and version is None:
            return None
        size = self._population_size(population)
        clip = round_spec.spec.clip_norm
        distributed = round_spec.dp_mechanism == "distributed"
        nxt = adapt_clip(clip, unclipped, reports, cfg.goal, spec, noised=distributed)
        z = distributed_noise_multiplier(round_spec, reports) if distributed else spec.noise_multiplier
        q = min(1.0, cfg.goal / max(1, size))
        layout = participation(cfg) if ftrl else None
        index = self.released(tx, population) if ftrl else None
        tx.execute("INSERT INTO dp_events (population, round_id, round_number, version, mechanism,"
                   " noise_multiplier, expected_reports, population_size, sampling_probability,"
                   " min_separation_s, reports, clip, next_clip, recorded_at, dp_index, min_separation_rounds,"
                   " max_participations, horizon_rounds, restart_every, count_stddev)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (population, round_id, round_number, version, round_spec.dp_mechanism, z, cfg.goal, size, q,
                    cfg.eligibility.min_separation_s, reports, clip, nxt, now, index,
                    layout and layout.b, layout and layout.k, layout and layout.horizon,
                    layout and layout.restart_every, round_spec.dp_count_stddev))
        if ftrl:
            self._took_part(tx, population, participants, index, layout.horizon)
        spent = self._spent(tx, population, cfg)
        if version is not None:
            assumption = "participation" if ftrl else "poisson"
            tx.execute("INSERT INTO dp_spent (population, version, epsilon, delta, accountant, rounds, mechanism,"
                       " assumption) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (population, version) DO UPDATE"
                       " SET epsilon = excluded.epsilon, delta = excluded.delta, accountant = excluded.accountant,"
                       " rounds = excluded.rounds, mechanism = excluded.mechanism, assumption = excluded.assumption",
                       (population, version, spent.epsilon, spent.delta, spent.accountant, spent.rounds,
                        round_spec.dp_mechanism, assumption))
        return spent

    def _spent(self, tx: Tx, population: str, cfg: PopulationConfig, extra_ftrl: int = 0) -> Spent:
        """(ε, δ) of everything the population released: DP-FedAvg's events composed by their accountant,
        DP-FTRL's rounds by theirs, the two added (basic composition) if a population used both."""
        delta = delta_for(cfg, self._population_size(population))
        fedavg = [e for e in self.events(tx, population) if e.mechanism != FTRL]
        released = self.released(tx, population) + extra_ftrl
        parts = [epsilon(fedavg, delta)] if fedavg else []
        if released:
            layout, spec = participation(cfg), cfg.dp
            z_values, count_stddev = spec.split(cfg.goal)
            f = ftrl_spent(z_values, count_stddev, released, layout.horizon, layout.k, layout.b, delta,
                           layout.restart_every)
            parts.append(Spent(f.epsilon, f.delta, f.accountant, f.rounds, f.by_accountant))
        if not parts:
            return Spent(0.0, delta, "none", 0, {})
        if len(parts) == 1:
            return parts[0]
        return Spent(sum(p.epsilon for p in parts), sum(p.delta for p in parts), "+".join(p.accountant for p in parts),
                     sum(p.rounds for p in parts), {})

    # -- reading --------------------------------------------------------------------------------

    @staticmethod
    def events(conn: Tx, population: str) -> list[Event]:
        return [Event(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT mechanism, noise_multiplier, sampling_probability FROM dp_events WHERE population = ?"
            " ORDER BY round_number", (population,))]

    def spent(self, population: str, version: int, conn: Tx | None = None) -> dict | None:
        """The (ε, δ) a version carries, with its mechanism and what ε assumes; None (made without DP)."""
        conn = conn or self._store.connection()
        row = conn.execute("SELECT epsilon, delta, accountant, rounds, mechanism, assumption FROM dp_spent WHERE"
                           " population = ? AND version = ?", (population, version)).fetchone()
        if row is None:
            return None
        return _finite(dict(epsilon=row[0], delta=row[1], accountant=row[2], rounds=row[3],
                            mechanism=row[4] or "central", assumption=row[5] or "poisson"))

    def publishable(self, conn: Tx, population: str, version: int, cfg: PopulationConfig) -> bool:
        """False for a version beyond the budget (a distributed round with dropouts can get there)."""
        if cfg.dp_budget is None:
            return True
        spent = self.spent(population, version, conn)
        return spent is None or (spent["epsilon"] is not None and spent["epsilon"] <= cfg.dp_budget.epsilon)

    def summary(self, population: str, cfg: PopulationConfig) -> dict | None:
        """The ledger as the operator sees it: the setting, the clip, the participation rule, what was spent."""
        if cfg.dp is None:
            return None
        conn = self._store.connection()
        rows = conn.execute("SELECT round_number, version, mechanism, noise_multiplier, expected_reports,"
                            " population_size, sampling_probability, min_separation_s, reports, clip, next_clip,"
                            " dp_index, min_separation_rounds, max_participations, horizon_rounds"
                            " FROM dp_events WHERE population = ? ORDER BY round_number", (population,)).fetchall()
        last = conn.execute("SELECT version, epsilon, delta, accountant, rounds, mechanism, assumption FROM dp_spent"
                            " WHERE population = ? ORDER BY version DESC LIMIT 1", (population,)).fetchone()
        out = {"dp": dataclasses.asdict(cfg.dp), "mechanism": cfg.dp.mechanism,
               "assumption": "participation" if cfg.dp.mechanism == FTRL else "poisson",
               "budget": dataclasses.asdict(cfg.dp_budget) if cfg.dp_budget else None,
               "clip": rows[-1]["next_clip"] if rows else cfg.dp.initial_clip,
               "rounds": len(rows), "spent": _finite(dict(last)) if last else None,
               "events": [dict(r) for r in rows[-50:]], "participation": None}
        if cfg.dp.mechanism == FTRL:
            layout = participation(cfg)
            refusals = conn.execute("SELECT refused, checkins FROM dp_refusals WHERE population = ?",
                                    (population,)).fetchone()
            out["participation"] = {**dataclasses.asdict(layout), "released": self.released(conn, population),
                                    "refused": refusals["refused"] if refusals else 0,
                                    "checked": refusals["checkins"] if refusals else 0}
        return out
