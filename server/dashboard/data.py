"""What each dashboard page shows, read from the services (the same reads as the JSON operator views).

Devices appear only under their pseudonyms (server.keys), as in every
operator view; counts of check-ins come from the Prometheus counters
(server.metrics), everything else from the database.
"""
from __future__ import annotations

import datetime
import zoneinfo

from server import metrics
from server.dashboard import svg
from server.populations import load_population

OUTCOMES = (("reported", "#3a9d5d"), ("aborted", "#e0a030"), ("failed", "#d0463c"), ("dropped", "#8a8a8a"),
            ("open", "#9cc3f0"))
DAY = 86400.0


def _round_counts(r: dict) -> dict:
    done = r["reported"] + r["aborted"] + r["failed"] + r["dropped"]
    return {"reported": r["reported"], "aborted": r["aborted"], "failed": r["failed"], "dropped": r["dropped"],
            "open": max(0, r["selected"] - done)}


def overview(svc) -> list[dict]:
    """One card per population: the newest round, the published version, devices, check-ins, ε."""
    checkins = metrics.totals("nightjar_checkins")
    now = svc.clock.now()
    cards = []
    for name in svc.populations():
        pop = load_population(svc.store.connection(), name)
        latest = svc.analytics.list(name, now, limit=1)
        ledger = svc.privacy.summary(name, svc.config.population(name))
        spent = (ledger or {}).get("spent") or {}
        budget = (ledger or {}).get("budget") or {}
        mine: dict[str, float] = {}
        for labels, value in checkins:
            if labels.get("population") == name:
                mine[labels["outcome"]] = mine.get(labels["outcome"], 0.0) + value
        cards.append({"name": name, "round": latest[0] if latest else None,
                      "current_version": pop.current_version, "published_version": pop.published_version,
                      "enrolled": svc.registry.count(name), "checkins": int(sum(mine.values())),
                      "checkin_outcomes": {k: int(v) for k, v in sorted(mine.items())},
                      "dp": ledger is not None, "epsilon": spent.get("epsilon"), "delta": spent.get("delta"),
                      "budget": budget.get("epsilon"), "accountant": spent.get("accountant")})
    return cards


def timeline(svc, population: str, limit: int = 30) -> dict:
    rounds = list(reversed(svc.analytics.list(population, svc.clock.now(), limit=limit)))
    counts = [_round_counts(r) for r in rounds]
    chart = svg.stacked_bars("devices per round by outcome", [str(r["round"]) for r in rounds],
                             [(k, color, [c[k] for c in counts]) for k, color in OUTCOMES],
                             links=[f"/dashboard/p/{population}/rounds/{r['round']}" for r in rounds])
    phases = svg.lines("phase durations (s, server clock)", [str(r["round"]) for r in rounds],
                       [(p, color, [r["phases"][p + "_s"] for r in rounds]) for p, color in
                        (("selection", "#4a7bd0"), ("reporting", "#e0a030"), ("finalize", "#3a9d5d"))])
    return {"rounds": list(reversed(rounds)), "chart": chart, "phases": phases}


def round_detail(svc, population: str, number: int) -> dict:
    detail = svc.analytics.detail(population, number, svc.clock.now())
    detail["counts"] = _round_counts(detail)
    return detail


def _zone_hours(stamps: list[float], zone: str) -> list[int]:
    tz = zoneinfo.ZoneInfo(zone)
    hours = [0] * 24
    for t in stamps:
        hours[datetime.datetime.fromtimestamp(t, tz).hour] += 1
    return hours


def participation(svc, population: str, days: float = 7.0) -> dict:
    """Selections and reports by local hour, in each of the population's configured time zones."""
    now = svc.clock.now()
    seen = svc.analytics.participation(population, now - days * DAY)
    zones = []
    for zone in svc.config.population(population).time_zones:
        selected, reported = _zone_hours(seen["selected"], zone), _zone_hours(seen["reported"], zone)
        zones.append({"zone": zone, "selected": selected, "reported": reported,
                      "chart": svg.stacked_bars(f"by local hour in {zone}", [f"{h:02d}" for h in range(24)],
                                                [("reported", "#3a9d5d", reported),
                                                 ("selected, no report", "#9cc3f0",
                                                  [s - r if s > r else 0 for s, r in zip(selected, reported)])])})
    return {"days": days, "selected": len(seen["selected"]), "reported": len(seen["reported"]), "zones": zones,
            "now": now}


def versions(svc, population: str, limit: int = 50) -> dict:
    published = load_population(svc.store.connection(), population).published_version
    rows = []
    for v in svc.versions.list(population, limit):
        rows.append({**v.to_json(), "dp": svc.privacy.spent(population, v.version), "live": v.version == published,
                     "exported": v.app_manifest_sha256 is not None})
    evals = [r for r in reversed(rows) if r["eval"]]
    metric = next((m for m in ("top1", "top3", "accuracy", "loss") if evals and m in evals[-1]["eval"]), None)
    chart = svg.lines(f"eval {metric} per version", [f"v{r['version']}" for r in evals],
                      [(metric, "#4a7bd0", [r["eval"].get(metric) for r in evals])]) if metric else None
    return {"versions": rows, "published": published, "chart": chart}


def version_detail(svc, population: str, number: int) -> dict:
    v = svc.versions.get(population, number)
    lineage, parent = [], v.parent
    while parent is not None and len(lineage) < 50:        # the chain of parents back to version 0
        p = svc.versions.get(population, parent)
        lineage.append({"version": p.version, "round": p.round_number, "eval": p.eval})
        parent = p.parent
    published = load_population(svc.store.connection(), population).published_version
    return {**v.to_json(), "lineage": lineage, "dp": svc.privacy.spent(population, v.version),
            "live": v.version == published, "exported": v.app_manifest_sha256 is not None, "published": published}


def health(svc, population: str) -> dict:
    rows = svc.analytics.health(population)
    xs = [str(r["round"]) for r in rows]
    ledger = svc.privacy.summary(population, svc.config.population(population))
    clip = svg.lines("clip norm per training round", xs, [("clip", "#4a7bd0", [r["clip_norm"] for r in rows])])
    fractions = svg.lines("fraction of reports at the clip, and zeroed", xs, [
        ("at clip", "#e0a030", [r["at_clip"] / r["norms_known"] if r["norms_known"] else None for r in rows]),
        ("zeroed", "#d0463c", [r["zeroed"] / r["reported"] if r["reported"] else None for r in rows])],
        y_fmt="{:.0%}", y_max=1.0)
    secure = [r for r in rows if r["secagg"]]
    secagg = svg.lines("secure aggregation: devices left at each phase", [str(r["round"]) for r in secure], [
        (phase, color, [r["secagg"][phase] for r in secure]) for phase, color in
        (("members", "#4a7bd0"), ("shared", "#e0a030"), ("survivors", "#3a9d5d"))]) if secure else None
    return {"rounds": list(reversed(rows)), "clip": clip, "fractions": fractions, "secagg": secagg,
            "dp": ledger, "any_zeroing": any(r["zeroing_limit"] for r in rows)}
