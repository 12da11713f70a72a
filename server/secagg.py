"""Secure aggregation over HTTP: the phases of a round whose updates the server cannot read.

The cryptography is contract.secagg.masking's; this module runs its phases against
the database (it owns the `secagg_*` tables) and never waits for a device:
each call records what one device sent, and `tick` (run by RoundService
inside its write transaction) moves a round on when the phase's devices
have all answered or its window has passed.

    keys       selected devices advertise their public keys and seed commitment;
               ends once the selection has closed and every selected device has
               advertised, or keys_window_s after the selection closed
    shares     the advertisers are numbered and joined in a random k-regular
               graph; each sends its neighbours their encrypted shares (the
               server relays ciphertexts it cannot read); ends when all have,
               or after shares_window_s
    masking    the devices that shared (minus any left with fewer than t
               neighbours that did) fetch their inbox, train, and upload masked
               updates into the round's modular running sum; ends as reporting
               does (goal, deadline, or everyone has uploaded)
    unmasking  each device that uploaded reveals, per neighbour, the share of
               its self-mask seed (it uploaded too) or of its masking key (it
               did not); when every secret has t shares the round completes:
               RoundService unmasks (`unmask`) and builds the version; after
               unmask_window_s without them, the round fails
               ("unmask_incomplete"). Nothing is unmasked from a partial set.

Too few devices left at any phase fails the round, which is then retried as
any failed round is. A closed round's keys, shares and reveals are deleted.
"""
from __future__ import annotations

import json
import secrets

import numpy as np

from contract.secagg import masking as sa
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares, SecAggStatus
from contract.clock import Clock
from server.config import PopulationConfig
from server import sessions
from server.errors import ErrorCode, ProtocolError
from server.store import Row, Store, Tx

POLL_CAP_S = 15.0          # a device comes back at least this often while it waits


def _domain(rnd) -> bytes:
    return rnd.update.fingerprint.encode()


class SecAggService:
    def __init__(self, store: Store, clock: Clock):
        self._store = store
        self._clock = clock

    # -- the round's side: RoundService calls these inside its write transaction ------------

    def open(self, tx: Tx, round_id: int) -> None:
        tx.execute("INSERT INTO secagg_rounds (round_id, phase) VALUES (?, 'keys')", (round_id,))

    def close_selection(self, tx: Tx, round_id: int, now: float, cfg: PopulationConfig) -> None:
        tx.execute("UPDATE secagg_rounds SET phase_ends_at = ? WHERE round_id = ? AND phase = 'keys'",
                   (now + cfg.secagg.keys_window_s, round_id))

    def tick(self, tx: Tx, rnd, now: float, cfg: PopulationConfig) -> str | None:
        """'complete' when the round can be unmasked, a failure reason, or None (nothing yet)."""
        row = self._row(tx, rnd.id)
        phase = row["phase"]
        if phase == "keys" and rnd.state == "reporting":
            advertised = {r["session_id"] for r in tx.execute("SELECT session_id FROM secagg_members WHERE"
                                                              " round_id = ?", (rnd.id,))}
            pending = sum(state == "assigned" and sid not in advertised
                          for sid, state in sessions.states(tx, rnd.id).items())
            if pending == 0 or now >= (row["phase_ends_at"] or now):
                advertised = self._in_phase(tx, rnd.id, "advertised")
                if advertised < rnd.min_reports:
                    return "too_few_keys"
                self._build_graph(tx, rnd.id, cfg, now)
        elif phase == "shares":
            if row["shared"] >= row["members"] or now >= row["phase_ends_at"]:
                cohort = self._prune(tx, rnd.id, row["t"])
                if len(cohort) < rnd.min_reports:
                    return "too_few_shares"
                tx.execute("UPDATE secagg_rounds SET phase = 'masking', phase_ends_at = ? WHERE round_id = ?",
                           (rnd.deadline, rnd.id))
        elif phase == "masking":
            masked = self._in_phase(tx, rnd.id, "shared", "accepted")
            outstanding = self._in_phase(tx, rnd.id, "shared", "assigned")
            if outstanding == 0 or rnd.reported >= rnd.goal or now >= rnd.deadline:
                if masked < rnd.min_reports:
                    return "too_few_reports"
                tx.execute("UPDATE secagg_rounds SET phase = 'unmasking', phase_ends_at = ?, survivors = ?"
                           " WHERE round_id = ?", (now + cfg.secagg.unmask_window_s, masked, rnd.id))
        elif phase == "unmasking":        # wait for every revealer, so wrong shares can be outvoted
            if self._unrevealed(tx, rnd.id) == 0:
                return "complete"
            if now >= row["phase_ends_at"]:
                return "complete" if self._missing_shares(tx, rnd.id, row["t"]) == 0 else "unmask_incomplete"
        return None

    def accepting(self, conn: Tx, round_id: int) -> bool:
        """Whether masked uploads still join the sum (re-checked inside the commit transaction)."""
        return self._row(conn, round_id)["phase"] == "masking"

    def unmask(self, tx: Tx, rnd, masked_sum: np.ndarray) -> tuple[np.ndarray, int]:
        """The survivors' plaintext sum (uint32 words) and their number; SecAggError if any secret cannot be
        rebuilt and checked. Wrong shares are corrected where enough honest ones were revealed
        (contract.secagg.masking.unmask_report); the sessions that revealed them are recorded either way,
        for the round's analytics (`wrong_revealers`)."""
        row = self._row(tx, rnd.id)
        members, survivors = self._members(tx, rnd.id)
        shares: dict[int, dict[int, tuple[str, bytes]]] = {}
        for r in tx.execute("SELECT owner, revealer, kind, share FROM secagg_reveals WHERE round_id = ?", (rnd.id,)):
            shares.setdefault(r["owner"], {})[r["revealer"]] = (r["kind"], bytes(r["share"]))
        try:
            report = sa.unmask_report(masked_sum, members, survivors, shares, row["t"], _domain(rnd))
        except sa.SecAggError as e:
            self._record_wrong(tx, rnd.id, e.wrong)
            raise
        self._record_wrong(tx, rnd.id, report.wrong)
        return report.total, len(survivors)

    def _record_wrong(self, tx: Tx, round_id: int, wrong: dict[int, frozenset[int]]) -> None:
        """The sessions whose revealed shares were wrong (by node, while the graph still exists)."""
        if not wrong:
            return
        nodes = sorted(wrong)
        sessions_ = [r["session_id"] for r in tx.execute(
            f"SELECT session_id FROM secagg_members WHERE round_id = ? AND node IN ({','.join('?' * len(nodes))})"
            " ORDER BY node", (round_id, *nodes))]
        tx.execute("UPDATE secagg_rounds SET wrong_revealers_json = ? WHERE round_id = ?",
                   (json.dumps(sessions_), round_id))

    def close(self, tx: Tx, round_id: int, state: str, reason: str | None) -> None:
        """The round ended: its keys, shares and reveals go; the phase row stays for analytics."""
        for table in ("secagg_shares", "secagg_reveals", "secagg_members"):
            tx.execute(f"DELETE FROM {table} WHERE round_id = ?", (round_id,))
        tx.execute("UPDATE secagg_rounds SET phase = ?, reason = ? WHERE round_id = ?",
                   ("done" if state == "completed" else "failed", reason, round_id))

    def summary(self, conn: Tx, round_id: int) -> dict | None:
        """The round's phase, graph (k, t), devices per phase, and the sessions that revealed wrong shares."""
        row = conn.execute("SELECT * FROM secagg_rounds WHERE round_id = ?", (round_id,)).fetchone()
        if row is None:
            return None
        out = {k: row[k] for k in ("phase", "k", "t", "members", "shared", "survivors", "reason")}
        out["wrong_revealers"] = json.loads(row["wrong_revealers_json"] or "[]")
        return out

    # -- the device's side --------------------------------------------------------------------

    def status(self, session: Row, rnd) -> SecAggStatus:
        conn = self._store.connection()
        row = self._row(conn, rnd.id)
        phase, now = row["phase"], self._clock.now()
        member = conn.execute("SELECT * FROM secagg_members WHERE session_id = ?", (session["id"],)).fetchone()
        ends = row["phase_ends_at"] if row["phase_ends_at"] is not None else rnd.selection_ends_at
        wait = round(min(POLL_CAP_S, max(1.0, ends - now)), 3)
        if phase in ("done", "failed"):
            return SecAggStatus(phase, None, True)
        if phase == "keys":
            return SecAggStatus("keys", wait, member is not None)
        if member is None or member["node"] is None or member["state"] == "excluded":
            return SecAggStatus("excluded", None, True)
        node, neighbours = member["node"], json.loads(member["neighbours_json"])
        if phase == "shares":
            keys = {r["node"]: sa.Neighbour(r["node"], bytes(r["enc_pk"]), bytes(r["mask_pk"])) for r in
                    conn.execute("SELECT node, enc_pk, mask_pk FROM secagg_members WHERE round_id = ? AND node"
                                 f" IN ({','.join('?' * len(neighbours))})", (rnd.id, *neighbours))}
            done = member["state"] == "shared"
            return SecAggStatus("shares", wait if done else None, done, node, row["t"],
                                tuple(keys[v] for v in sorted(keys)))
        if phase == "masking":
            inbox = {r["sender"]: bytes(r["ciphertext"]) for r in conn.execute(
                "SELECT s.sender, s.ciphertext FROM secagg_shares s JOIN secagg_members m ON m.round_id = s.round_id"
                " AND m.node = s.sender WHERE s.round_id = ? AND s.receiver = ? AND m.state = 'shared'",
                (rnd.id, node))}
            done = session["state"] != "assigned"
            return SecAggStatus("masking", wait if done else None, done, node, row["t"], inbox=inbox)
        survivors, dropped = self._asked(conn, rnd.id, node)
        done = conn.execute("SELECT 1 FROM secagg_reveals WHERE round_id = ? AND revealer = ? LIMIT 1",
                            (rnd.id, node)).fetchone() is not None
        if session["state"] != "accepted":       # it did not upload: nothing to reveal
            return SecAggStatus("unmasking", None, True, node, row["t"])
        return SecAggStatus("unmasking", wait if done else None, done, node, row["t"],
                            survivors=tuple(survivors), dropped=tuple(dropped))

    def advertise(self, session: Row, rnd, keys: SecAggKeys) -> None:
        a = keys.advertisement
        with self._store.write() as tx:
            if self._row(tx, rnd.id)["phase"] != "keys":
                raise ProtocolError(ErrorCode.WRONG_PHASE, "the round's keys phase is over")
            old = tx.execute("SELECT enc_pk, mask_pk, commitment FROM secagg_members WHERE session_id = ?",
                             (session["id"],)).fetchone()
            if old is not None:
                if (bytes(old[0]), bytes(old[1]), bytes(old[2])) != (a.enc_pk, a.mask_pk, a.commitment):
                    raise ProtocolError(ErrorCode.CONFLICT, "this session advertised other keys")
                return
            if a.enc_pk == a.mask_pk:
                raise ProtocolError(ErrorCode.INVALID_KEYS, "the two public keys must differ")
            tx.execute("INSERT INTO secagg_members (session_id, round_id, enc_pk, mask_pk, commitment)"
                       " VALUES (?, ?, ?, ?, ?)", (session["id"], rnd.id, a.enc_pk, a.mask_pk, a.commitment))

    def submit_shares(self, session: Row, rnd, shares: SecAggShares) -> None:
        with self._store.write() as tx:
            member = self._member_in(tx, session, rnd, "shares")
            if member["state"] == "shared":
                return                                   # idempotent: the first copy stands
            neighbours = set(json.loads(member["neighbours_json"]))
            if set(shares.shares) != neighbours:
                raise ProtocolError(ErrorCode.INVALID_KEYS, f"exactly one share per neighbour "
                                    f"({len(neighbours)}), for {sorted(neighbours)[:8]}...")
            tx.executemany("INSERT INTO secagg_shares (round_id, sender, receiver, ciphertext) VALUES (?, ?, ?, ?)",
                           [(rnd.id, member["node"], to, blob) for to, blob in shares.shares.items()])
            tx.execute("UPDATE secagg_members SET state = 'shared' WHERE session_id = ?", (session["id"],))
            tx.execute("UPDATE secagg_rounds SET shared = shared + 1 WHERE round_id = ?", (rnd.id,))

    def reveal(self, session: Row, rnd, reveal: SecAggReveal) -> None:
        with self._store.write() as tx:
            member = self._member_in(tx, session, rnd, "unmasking")
            if session["state"] != "accepted":
                raise ProtocolError(ErrorCode.NOT_IN_COHORT, "only devices whose update was summed reveal")
            survivors, dropped = self._asked(tx, rnd.id, member["node"])
            wanted = {o: sa.SELF for o in survivors} | {o: sa.KEY for o in dropped}
            given = {o: kind for o, (kind, _) in reveal.shares.items()}
            if given != wanted:
                raise ProtocolError(ErrorCode.INVALID_KEYS, "reveal exactly the shares asked for: the self "
                                    "share of each surviving neighbour, the key share of each dropped one")
            tx.executemany("INSERT INTO secagg_reveals (round_id, owner, revealer, kind, share)"
                           " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", [(rnd.id, o, member["node"], kind, share)
                                                      for o, (kind, share) in reveal.shares.items()])

    def check_upload(self, conn: Tx, session: Row, rnd) -> bool:
        """Whether a masked upload may join the sum now (False: too late, it is aborted)."""
        phase = self._row(conn, rnd.id)["phase"]
        if phase in ("keys", "shares"):
            raise ProtocolError(ErrorCode.WRONG_PHASE, f"the round is in its {phase} phase: upload once "
                                "GET /v1/sessions/<id>/secagg says masking")
        member = conn.execute("SELECT state FROM secagg_members WHERE session_id = ?", (session["id"],)).fetchone()
        if phase == "masking" and (member is None or member["state"] != "shared"):
            raise ProtocolError(ErrorCode.NOT_IN_COHORT, "this session is not in the round's masking set")
        return phase == "masking"

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _row(conn: Tx, round_id: int) -> Row:
        return conn.execute("SELECT * FROM secagg_rounds WHERE round_id = ?", (round_id,)).fetchone()

    @staticmethod
    def _in_phase(conn: Tx, round_id: int, member_state: str, session_state: str = "assigned") -> int:
        """Members in `member_state` whose session is in `session_state`."""
        states = sessions.states(conn, round_id)
        return sum(states.get(r["session_id"]) == session_state for r in conn.execute(
            "SELECT session_id FROM secagg_members WHERE round_id = ? AND state = ?", (round_id, member_state)))

    def _member_in(self, tx: Tx, session: Row, rnd, phase: str) -> Row:
        current = self._row(tx, rnd.id)["phase"]
        if current != phase:
            raise ProtocolError(ErrorCode.WRONG_PHASE, f"the round is in its {current} phase, not {phase}")
        member = tx.execute("SELECT * FROM secagg_members WHERE session_id = ?", (session["id"],)).fetchone()
        if member is None or member["node"] is None or member["state"] == "excluded":
            raise ProtocolError(ErrorCode.NOT_IN_COHORT, "this session is not in the round's neighbour graph")
        return member

    def _build_graph(self, tx: Tx, round_id: int, cfg: PopulationConfig, now: float) -> None:
        states = sessions.states(tx, round_id)
        members = sorted(r["session_id"] for r in tx.execute("SELECT session_id FROM secagg_members WHERE"
                                                             " round_id = ?", (round_id,))
                         if states.get(r["session_id"]) == "assigned")
        secrets.SystemRandom().shuffle(members)
        n = len(members)
        k = min(cfg.secagg.neighbours or sa.default_degree(n, cfg.secagg.max_dropout), n - 1)
        graph = sa.neighbour_graph(n, k)
        tx.execute("UPDATE secagg_members SET state = 'excluded' WHERE round_id = ?", (round_id,))
        tx.executemany("UPDATE secagg_members SET node = ?, neighbours_json = ?, state = 'member'"
                       " WHERE session_id = ?",
                       [(node, json.dumps(sorted(graph[node])), sid) for node, sid in enumerate(members, 1)])
        tx.execute("UPDATE secagg_rounds SET phase = 'shares', k = ?, t = ?, members = ?, phase_ends_at = ?"
                   " WHERE round_id = ?", (k, sa.threshold(k), n, now + cfg.secagg.shares_window_s, round_id))

    def _prune(self, tx: Tx, round_id: int, t: int) -> set[int]:
        """The masking set (contract.secagg.masking.masking_set); the rest leave the round."""
        rows = tx.execute("SELECT node, neighbours_json, state FROM secagg_members WHERE round_id = ?"
                          " AND node IS NOT NULL", (round_id,)).fetchall()
        cohort = sa.masking_set({r["node"]: set(json.loads(r["neighbours_json"])) for r in rows},
                                {r["node"] for r in rows if r["state"] == "shared"}, t)
        tx.execute(f"UPDATE secagg_members SET state = 'excluded' WHERE round_id = ? AND node IS NOT NULL"
                   f" AND node NOT IN ({','.join('?' * len(cohort))})", (round_id, *cohort))
        return cohort

    def _members(self, conn: Tx, round_id: int) -> tuple[dict[int, sa.Member], set[int]]:
        states = sessions.states(conn, round_id)
        rows = conn.execute("SELECT session_id, node, mask_pk, commitment, neighbours_json FROM secagg_members"
                            " WHERE round_id = ? AND state = 'shared'", (round_id,)).fetchall()
        cohort = {r["node"] for r in rows}
        members = {r["node"]: sa.Member(r["node"], bytes(r["mask_pk"]), bytes(r["commitment"]),
                                        frozenset(set(json.loads(r["neighbours_json"])) & cohort)) for r in rows}
        return members, {r["node"] for r in rows if states.get(r["session_id"]) == "accepted"}

    def _asked(self, conn: Tx, round_id: int, node: int) -> tuple[list[int], list[int]]:
        """What `node` is asked to reveal: its maskers that uploaded (self shares), the rest (key shares)."""
        members, survivors = self._members(conn, round_id)
        maskers = members[node].maskers if node in members else frozenset()
        return sorted(maskers & survivors), sorted(maskers - survivors)

    def _unrevealed(self, conn: Tx, round_id: int) -> int:
        """Survivors asked to reveal shares that have not answered yet."""
        members, survivors = self._members(conn, round_id)
        answered = {r["revealer"] for r in conn.execute("SELECT DISTINCT revealer FROM secagg_reveals WHERE"
                                                         " round_id = ?", (round_id,))}
        return sum(1 for u in survivors if members[u].maskers and u not in answered)

    def _missing_shares(self, conn: Tx, round_id: int, t: int) -> int:
        """Secrets of the masking set with fewer than t revealed shares of the kind they need."""
        members, survivors = self._members(conn, round_id)
        counts = {(r["owner"], r["kind"]): r["n"] for r in conn.execute(
            "SELECT owner, kind, COUNT(*) AS n FROM secagg_reveals WHERE round_id = ? GROUP BY owner, kind",
            (round_id,))}
        return sum(counts.get((o, sa.SELF if o in survivors else sa.KEY), 0) < t for o in members)
