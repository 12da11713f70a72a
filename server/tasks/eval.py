"""The eval kind: devices score a version on their own text; summed counts decide whether it is published.

A round is due after every `eval_every` versions trained since the last
evaluation. Each device reports its top-1/top-3 hits, positions and summed
loss (contract.protocol.wire.EvalReport, checked at the door); the commit adds them to the
round's sums, so no device's own figures are kept beyond its session row.
When the round completes, the sums become the version's evaluation, and a
version at least `publish_every` versions after the published one that is
not worse on top-3 (and within the privacy budget) is queued for publishing.
"""
from __future__ import annotations

from collections.abc import Callable

from server import sessions
from server.config import PopulationConfig
from server.populations import Population
from server.privacy import PrivacyLedger
from server.round import Round
from server.store import Tx
from server.tasks import Contribution, KindBase, RoundHistory, RoundPlan
from server.versions import VersionRegistry


class EvalKind(KindBase):
    name = "eval"

    def __init__(self, history: RoundHistory, versions: VersionRegistry, privacy: PrivacyLedger,
                 settings: Callable[[str], PopulationConfig], publish: Callable[[Tx, str, int], None]):
        self._history, self._versions, self._privacy = history, versions, privacy
        self._settings, self._publish = settings, publish

    def due(self, tx: Tx, population: Population, cfg: PopulationConfig) -> bool:
        return bool(cfg.eval_every) and population.train_since_eval >= cfg.eval_every

    def plan(self, tx: Tx, population: Population, cfg: PopulationConfig, number: int) -> RoundPlan:
        return RoundPlan()

    def record(self, tx: Tx, rnd: Round, session_id: str, contribution: Contribution) -> None:
        report = contribution.report
        counts = {k: v for k, v in report.to_json().items() if k != "model_version"}
        self._history.add_metrics(tx, rnd.id, counts)
        sessions.record_report(tx, session_id, report.positions, counts)

    def finish(self, tx: Tx, rnd: Round) -> int | None:
        sums = self._history.metric_sums(tx, rnd.id)
        positions = int(sums.get("positions", 0))
        result = {"round": rnd.number, "reports": rnd.reported, "positions": positions,
                  "top1_hits": int(sums.get("top1_hits", 0)), "top3_hits": int(sums.get("top3_hits", 0))}
        result["top1"] = result["top1_hits"] / max(positions, 1)
        result["top3"] = result["top3_hits"] / max(positions, 1)
        if "loss_sum" in sums:
            result["loss"] = sums["loss_sum"] / max(positions, 1)
        cfg = self._settings(rnd.population)
        if (self._versions.record_eval(tx, rnd.population, rnd.model_version, result, cfg.publish_every)
                and self._privacy.publishable(tx, rnd.population, rnd.model_version, cfg)):
            self._publish(tx, rnd.population, rnd.model_version)
        return None
