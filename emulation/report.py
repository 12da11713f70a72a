"""A fleet run in numbers and as text: what the phones did, what the server decided.

`summarize` turns a finished `Fleet` and the server's last status into one
dictionary (the demo and the benchmarks write it as JSON); `format_summary`
prints it, one line per subject, after a table of the rounds.
"""
from __future__ import annotations

import collections
import time

from emulation.fleet import Fleet, FleetStatus


def totals(fleet: Fleet) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for counts in fleet.hourly.values():
        out.update(counts)
    return out


def summarize(fleet: Fleet, status: FleetStatus, wall_s: float, sim_start: float) -> dict:
    """The run in numbers: what the phones did, what the server decided, what was injected."""
    t = totals(fleet)

    def by_reason(prefix: str) -> dict[str, int]:
        return {k.split(":", 1)[1]: n for k, n in t.items() if k.startswith(prefix)}

    rounds = sorted(status.rounds, key=lambda r: r["round"])
    return {
        "phones": len(fleet.phones), "wall_s": wall_s,
        "sim_start": sim_start, "sim_end": status.sim_now, "sim_hours": (status.sim_now - sim_start) / 3600,
        "wakes": fleet.wakes,
        "checkins": t["checkin/assigned"] + t["checkin/rejected"] + t["checkin/error"],
        "assigned": t["checkin/assigned"], "rejected": t["checkin/rejected"],
        "checkin_errors": t["checkin/error"],
        "not_eligible_locally": t["policy/not_eligible"],
        "tasks_completed": t["train/completed"], "tasks_discarded": t["train/discarded"],
        "tasks_interrupted": by_reason("train/interrupted:"), "task_errors": by_reason("train/error:"),
        "eval_tasks": sum(n for k, n in t.items() if k.startswith("eval/")),
        "uploads": len(fleet.uploads),
        "faults_injected": dict(fleet.faults.injected),
        "runtime_errors": len(fleet.errors),
        "rounds": [{k: r[k] for k in ("round", "task", "state", "reason", "model_version",
                                      "result_version", "selected", "reported", "aborted", "failed",
                                      "dropped", "bytes_in", "opened_at", "closed_at")} for r in rounds],
        "train_rounds_completed": status.train_completed,
        "published_versions": status.published,
        "phones_with_app_model": sum(p.app_version is not None for p in fleet.phones),
    }


def format_rounds(rounds: list[dict]) -> str:
    lines = [f"{'round':>5} {'task':>5} {'state':>9} {'version':>9} {'selected':>8} {'reported':>8} "
             f"{'aborted':>7} {'failed':>6} {'dropped':>7} {'MB up':>7}  sim time (UTC)"]
    for r in rounds:
        ver = (f"{r['model_version']}→{r['result_version']}" if r.get("result_version") is not None
               else f"{r['model_version']}")
        when = time.strftime("%a %H:%M", time.gmtime(r["opened_at"]))
        lines.append(f"{r['round']:>5} {r['task']:>5} {r['state']:>9} {ver:>9} {r['selected']:>8} "
                     f"{r['reported']:>8} {r['aborted']:>7} {r['failed']:>6} {r['dropped']:>7} "
                     f"{r.get('bytes_in', 0) / 1e6:>7.2f}  {when}"
                     + (f"  ({r['reason']})" if r.get("reason") else ""))
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    hours = s["sim_hours"]
    interrupted = ", ".join(f"{k} {n}" for k, n in sorted(s["tasks_interrupted"].items())) or "none"
    faults = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in s["faults_injected"].items() if n) or "none"
    start = time.strftime("%a %H:%M", time.gmtime(s["sim_start"]))
    end = time.strftime("%a %H:%M", time.gmtime(s["sim_end"]))
    return "\n".join([
        format_rounds(s["rounds"]), "",
        f"fleet: {s['phones']} phones; simulated {start} → {end} UTC ({hours:.1f} h) in "
        f"{s['wall_s']:.0f} s of wall time",
        f"phones: {s['checkins']} check-ins ({s['assigned']} assigned, {s['rejected']} rejected), "
        f"{s['not_eligible_locally']} wake-ups not eligible (policy: window, charger, Wi-Fi, idle)",
        f"training tasks: {s['tasks_completed']} accepted, {s['tasks_discarded']} not needed (late or "
        f"round full), interrupted: {interrupted}, errors: {sum(s['task_errors'].values())}; "
        f"{s['eval_tasks']} evaluation tasks",
        f"faults injected: {faults}; runtime errors: {s['runtime_errors']}",
        f"rounds: {s['train_rounds_completed']} training rounds completed; published versions: "
        f"{s['published_versions'] or 'none'}; {s['phones_with_app_model']} phones hold a published app model",
    ])
