"""The personalize kind: phones judge their personal models; only the sum of their counts reaches the server.

It owns the `personal_evals` table. A round is due every
`personal_eval_every` completed training rounds of a population with a
`[personalization]` table. Each selected phone personalizes the round's model
on the first 80% of its text and scores the global and the personal model on
the rest (contract.tasks.personal.evaluate); its report is one vector of
counts (contract.tasks.personal.PersonalReport), checked and then added to
the round's sum in the transaction that counts it. Only the sum is stored —
no row holds one device's figures. Under secure aggregation the reports
arrive masked (contract.secagg), the sum is kept modulo 2^32 and unmasked
when the round completes, and only that sum is checked. The round's detail
shows what the sum says: both models' top-1, the per-device top-1
histograms and the fractions helped, hurt and fallen back
(contract.tasks.personal.summarize), with the fairness figures the
histograms allow.
"""
from __future__ import annotations

import json

import numpy as np

from contract.secagg.masking import WORD_MODULUS, SecAggError
from contract.secagg.plausible import ImplausibleSum, check_count_sum
from contract.tasks.personal import PersonalEvalReport, check_counts, fairness_from_histogram, summarize
from server.config import PopulationConfig
from server.errors import ErrorCode, ProtocolError
from server.populations import Population
from server.round import Round
from server.secagg import SecAggService
from server.store import Row, Tx
from server.tasks import Contribution, KindBase, RoundFailed, RoundHistory, RoundPlan, bind_round_spec

RETRIES = 1               # a failed personalize round is tried again this often, at once


class PersonalizeKind(KindBase):
    name = "personalize"

    def __init__(self, history: RoundHistory, secagg: SecAggService):
        self._history, self._secagg = history, secagg

    def due(self, tx: Tx, population: Population, cfg: PopulationConfig) -> bool:
        """Whether `personal_eval_every` training rounds have completed since the last personalize round that
        counts: the last completed one, or the last one that failed on its retry (a failed round is tried
        again once, at once; then training goes on, so a failing evaluation never stalls training)."""
        every = cfg.personal_eval_every
        if not every:
            return False
        last_round = self._history.latest_of(tx, population.name, self.name)
        if last_round is not None and last_round.state == "failed" and last_round.attempt >= 1 + RETRIES:
            last = last_round.number
        else:
            last = self._history.last_completed_number(tx, population.name, self.name)
        return self._history.completed_since(tx, population.name, "train", last) >= every

    def plan(self, tx: Tx, population: Population, cfg: PopulationConfig, number: int) -> RoundPlan:
        if cfg.update.secure_aggregation:          # its counts travel masked, like training updates
            return RoundPlan(update=bind_round_spec(cfg.update, population, cfg, number))
        return RoundPlan()

    def assignment(self, tx: Tx, rnd: Round, population: Population, cfg: PopulationConfig) -> dict:
        return {"personalization": cfg.personalization.to_json() if cfg.personalization is not None else None}

    def check(self, conn: Tx, session: Row, rnd: Round, report: PersonalEvalReport) -> PersonalEvalReport:
        if report.masked != rnd.secure:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "this round's counts must be masked (secure aggregation)"
                                if rnd.secure else "this round is not securely aggregated: send plain counts")
        return report

    def record(self, tx: Tx, rnd: Round, session_id: str, contribution: Contribution) -> None:
        """Add one device's counts to the round's sum: checked ones as integers, masked ones (secure
        aggregation) modulo 2^32, to be unmasked when the round completes."""
        report = contribution.report
        row = tx.execute("SELECT counts_json, devices FROM personal_evals WHERE round_id = ?", (rnd.id,)).fetchone()
        counts = np.asarray(report.counts, np.int64)
        if row is None:
            tx.execute("INSERT INTO personal_evals (round_id, counts_json, devices) VALUES (?, ?, 1)",
                       (rnd.id, json.dumps(counts.tolist())))
            return
        stored = np.asarray(json.loads(row["counts_json"]), np.int64)
        total = (stored + counts) % WORD_MODULUS if report.masked else check_counts(stored, row["devices"]) + counts
        tx.execute("UPDATE personal_evals SET counts_json = ?, devices = devices + 1 WHERE round_id = ?",
                   (json.dumps(total.tolist()), rnd.id))

    def finish(self, tx: Tx, rnd: Round) -> int | None:
        """The sum is already stored; a secure round's is unmasked and checked in place."""
        if not rnd.secure:
            return None
        row = tx.execute("SELECT counts_json FROM personal_evals WHERE round_id = ?", (rnd.id,)).fetchone()
        if row is None:
            raise RoundFailed("too_few_reports")
        masked = np.asarray(json.loads(row["counts_json"]), np.int64).astype(np.uint32)
        try:
            plain, survivors = self._secagg.unmask(tx, rnd, masked)
        except SecAggError as e:
            raise RoundFailed("unmask_failed", str(e)) from None
        try:                          # the sum of honest reports is always consistent
            total = check_count_sum([int(x) for x in np.asarray(plain, np.int64)], survivors)
        except ImplausibleSum as e:
            raise RoundFailed("implausible_sum", str(e)) from None
        tx.execute("UPDATE personal_evals SET counts_json = ?, devices = ? WHERE round_id = ?",
                   (json.dumps(total.tolist()), survivors, rnd.id))
        return None

    def discard(self, tx: Tx, rnd: Round, completed: bool) -> None:
        """A failed round's partial sum goes (nothing of it is reported)."""
        if not completed:
            tx.execute("DELETE FROM personal_evals WHERE round_id = ?", (rnd.id,))

    # -- what operators see ---------------------------------------------------------------------

    def detail(self, conn: Tx, rnd: Round) -> dict:
        """What the summed reports say (a secure round's sum means something only once unmasked)."""
        if rnd.secure and rnd.state != "completed":
            return {"personalization": None}
        return {"personalization": self.summary(conn, rnd.id)}

    @staticmethod
    def summary(conn: Tx, round_id: int) -> dict | None:
        row = conn.execute("SELECT counts_json FROM personal_evals WHERE round_id = ?", (round_id,)).fetchone()
        if row is None:
            return None
        out = summarize(json.loads(row["counts_json"]))
        h = out["histogram"]
        out["fairness"] = {"global": fairness_from_histogram(h["global"]),
                           "personal": fairness_from_histogram(h["personal"])}
        return out

    def latest(self, conn: Tx, population: str) -> dict | None:
        """The summary of the population's last completed personalize round, with its number."""
        rnd = self._history.latest_of(conn, population, self.name, state="completed")
        summary = self.summary(conn, rnd.id) if rnd is not None else None
        if summary is None:
            return None
        return {"round": rnd.number, "model_version": rnd.model_version, **summary}
