"""`make report` (and the end of `make bench`): benchmarks/results/*.json → benchmarks/REPORT.md.

One Markdown report with the machine described (CPU, cores, memory, OS,
Python and the versions of TensorFlow, TFF, LiteRT and the server stack) and
a section per result file; a result not yet measured says which target
makes it. The headline figures also go into README.md between the
`<!-- bench:begin -->` / `<!-- bench:end -->` markers. Nothing is measured
here and TensorFlow is not imported (versions come from package metadata).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from benchmarks import RESULTS

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tensorflow", "tensorflow-federated", "ai-edge-litert", "numpy", "flask", "gunicorn")


def machine() -> dict:
    def first(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem_kb = first("/proc/meminfo", "MemTotal")
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"cpu": first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
            "cores": os.cpu_count(),
            "memory_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
            "os": platform.platform(), "python": platform.python_version(), "packages": versions}


def _pct(x: float) -> str:
    return f"{x:.2%}"


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def quality(r: dict) -> str:
    from benchmarks.quality import table

    return table(r)


def dp(r: dict) -> str:
    b = r["baseline"]
    rows = [("non-private", "", "", "", f"{_pct(b['top1'])} / {_pct(b['top3'])}", "")]
    for x in (x for x in r["rows"] if "comparison" not in x):
        scale = (f"projection: N = {x['population']:,}, m = {x['reports_per_round']:,}" if x["projection"]
                 else f"this population: N = {x['population']:,}, m = {x['reports_per_round']}")
        rows.append((x["mechanism"], f"{x['noise_multiplier']:g}", scale,
                     f"{x['epsilon']:.3g} ({x['accountant']}, δ = {x['delta']:.1e})",
                     f"{_pct(x['top1'])} / {_pct(x['top3'])}", f"{x['top1'] / b['top1'] - 1:+.1%}"))
    head = "| mechanism | z | deployment | ε | top-1 / top-3 | top-1 vs non-private |\n|---|---|---|---|---|---|\n"
    t = r.get("targets", {})
    verdict = (f"Target (Gboard scale: ε ≤ 2 within 5% of non-private top-1): "
               f"{'met' if t.get('met') else 'not met'}; goal (ε ≤ 1 within 2%): {'met' if t.get('goal_met') else 'not met'}.")
    out = head + "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows) + "\n\n" + verdict
    if not any("comparison" in x for x in r["rows"]):
        return out
    from benchmarks.dp_ftrl import table

    return out + "\n\n" + table(r)


def attacks(r: dict) -> str:
    parts = []
    if "clean" in r:
        parts.append(_attack_table(r, f"Server step: {r['config']['server_optimizer']} at "
                                      f"{r['config']['server_lr']:g}, {r['config']['rounds']} rounds."))
    for name, f in sorted((k, v) for k, v in r.get("fleet", {}).items() if isinstance(v, dict)):
        clean = r["fleet"].get("clean_demo_top1")
        parts.append(f"Emulated fleet through the real server ({name} defences): {f['attackers']} of {f['phones']} "
                     f"phones a Sybil party's, {f['rounds']} training rounds; last version {f['final_version']}: "
                     f"held-out top-1 {_pct(f['top1'])}" + (f" (the demo's clean run {_pct(clean)})" if clean else "")
                     + f", backdoor success {f['backdoor_success']:.0%} (at most "
                     f"{max(v['backdoor_success'] for v in f['by_version']):.0%} in any evaluated version); "
                     f"{f['attacker_uploads_accepted']} of {f['uploads_accepted']} accepted uploads were the "
                     "attackers'.")
    if "adaptive_server" in r:
        a = r["adaptive_server"]
        parts.append(_attack_table(a, f"An adaptive server step (Adam at {a['config']['server_lr']:g}, "
                                      f"{a['config']['rounds']} rounds) undoes norm bounding:"))
    return "\n\n".join(parts)


def _attack_table(r: dict, title: str) -> str:
    clean = r["clean"]["top1"]
    rows = [("none (clean)", "", "", _pct(clean), "", "")]
    for x in r["runs"]:
        rows.append((x["attack"], f"{x['attacker_fraction']:.0%}", " + ".join(x["defences"]) or "none",
                     _pct(x["top1"]), f"{100 * (x['top1'] - clean):+.2f}", f"{x['backdoor_success']:.0%}"
                     if x["attack"] != "sign_flip" else ""))
    head = (f"{title}\n\n| attack | attackers | defences | top-1 | vs clean (points) | backdoor success |\n"
            "|---|---|---|---|---|---|\n")
    best = [x for x in r["runs"] if x["attacker_fraction"] >= 0.1 and set(x["defences"]) == {"clip", "dp"}]
    verdict = ("Target (all defences at 10%: top-1 loss ≤ 0.5 points, backdoor ≤ 5%): " + (
        "met" if all(clean - x["top1"] <= 0.005 and x["backdoor_success"] <= 0.05 for x in best)
        else "not met") + ".") if best else ""
    return head + "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows) + "\n\n" + verdict


def personalization(r: dict) -> str:
    if r.get("selection") != "training users":
        return _personalization_in_sample(r)
    rows = [("global", r["global"]), ("personal (after fallback)", r["personal"])]
    head = ("| model | mean per-user top-1 | micro top-1 | median | p10 | worst decile (mean) | below half the mean |\n"
            "|---|---|---|---|---|---|---|\n")
    table = head + "\n".join(f"| {name} | {_pct(x['top1'])} | {_pct(x['micro_top1'])} | {_pct(x['median'])} | "
                             f"{_pct(x['p10'])} | {_pct(x['worst_decile'])} | {x['below_half_mean']:.1%} |"
                             for name, x in rows)
    spec = r["spec"]
    t = r["training_users"]
    chosen = t["chosen"]
    families = "\n".join(f"| {name} | {v['spec']['cache_weight']} / {v['spec']['cache_smoothing']} / "
                          f"{v['spec']['fallback_nats']} / {v['spec']['epochs']}×{v['spec']['lr']} | "
                          f"{v['relative_gain']:+.1%} | {v['micro_gain']:+.1%} | {v['hurt']:.0%} | {v['fell_back']:.0%} |"
                          for name, v in t["best_of_each_family"].items())
    met = r["meets_targets"]
    old = r.get("in_sample_previous")
    earlier = (f" The earlier figure, {old['relative_gain']:+.1%}, had its settings chosen on these same "
               "held-out users (in-sample)." if old and "relative_gain" in old else "")
    return (f"Settings chosen on the {chosen['users']} training users only, measured once on {r['users']} held-out "
            f"users ({r['positions']:,} positions); global model: {r['global_model']}.\n\n{table}\n\n"
            f"Gain over the global model (same predictor minus personalization): per-user mean "
            f"{r['relative_gain']:+.1%}, micro-averaged {r['micro_gain']:+.1%}; helped {r['helped']:.0%}, hurt "
            f"{r['hurt']:.0%}, fell back {r['fell_back']:.0%}.{earlier}\n\nChosen (of {t['settings_tried']} settings): "
            f"cache weight {spec['cache_weight']}, smoothing {spec['cache_smoothing']}, fallback tolerance "
            f"{spec['fallback_nats']} nats, fine-tuning {spec['epochs']} epoch(s) at {spec['lr']} "
            f"({', '.join(r['personal_layers']) if isinstance(r['personal_layers'], list) else 'all layers'}); on "
            f"the training users it gave {chosen['relative_gain']:+.1%} (micro {chosen['micro_gain']:+.1%}), "
            f"{chosen['hurt']:.0%} hurt. The best of each kind on the training users:\n\n"
            f"| kind | λ / κ / tolerance / fine-tuning | per-user gain | micro gain | hurt | fell back |\n"
            f"|---|---|---|---|---|---|\n{families}\n\nPersonalization on the median user "
            f"({r['median_user_windows']} windows): {r['finetune_s_median_user']:.2f} s; a personal suggestion p50 "
            f"{r['suggest_ms_p50']:.2f} ms (p99 {r['suggest_ms_p99']:.2f} ms).\n\nTarget (per-user gain ≥ 5%, < 10% "
            f"of users hurt, worst decile not below the global model's): "
            f"{'met' if all(met.values()) else 'not met (' + ', '.join(k for k, v in met.items() if not v) + ')'}"
            f"; goal (gain ≥ 10%): {'met' if r['relative_gain'] >= 0.10 else 'not met'}. "
            "Plot: `benchmarks/results/personalization.png`.")


def _personalization_in_sample(r: dict) -> str:
    """A result from before settings were chosen on training users (kept readable)."""
    rows = [("global", r["global"]), ("personal (after fallback)", r["personal"])]
    head = ("| model | mean top-1 | median | worst decile (p10) | below half the mean |\n"
            "|---|---|---|---|---|\n")
    table = head + "\n".join(f"| {name} | {_pct(x['top1'])} | {_pct(x['median'])} | {_pct(x['p10'])} | "
                             f"{x['below_half_mean']:.1%} |" for name, x in rows)
    return (f"{r['users']} held-out users, global model: {r['global_model']}.\n\n{table}\n\n"
            f"Relative gain {r['relative_gain']:+.1%}; helped {r['helped']:.0%}, hurt {r['hurt']:.0%}, fell back "
            f"{r['fell_back']:.0%}. In-sample: the settings were chosen on these same users.")


def export(r: dict) -> str:
    where = r.get("app_model_bytes_by_weight", {})
    split = (" — " + ", ".join(f"{k} {v:,}" for k, v in where.items())) if where else ""
    targets = r.get("targets", {})
    verdict = ""
    if "top1_agreement_min" in targets:
        met = r["meets_targets"]
        verdict = (f"\n\nTarget (app model ≤ {targets['app_model_bytes_max']:,} B, top-1 agreement ≥ "
                   f"{targets['top1_agreement_min']:.0%} on trained weights): "
                   f"{'met' if met['app_model_bytes'] and met['top1_agreement_trained'] else 'not met'}.")
    return _table([("plan size", f"{r['plan_bytes']:,} B ({r.get('plan_to_float_weights', 0):.2f}× the float weights)"),
                   ("app model size", f"{r['app_model_bytes']:,} B{split}"),
                   ("LiteRT train step, 16×20 batch (median)", f"{r['train_step_ms_median']:.1f} ms"),
                   ("suggestion latency p50 / p99", f"{r['suggest_ms_p50']:.2f} / {r['suggest_ms_p99']:.2f} ms"),
                   ("LiteRT threads", r["threads"])]) + _judged(r.get("judged", {})) + verdict


def _judged(judged: dict) -> str:
    if not judged:
        return ""
    rows = "\n".join(f"| {name} | {j['top1_agreement']:.2%} | {j['float']['top1']:.2%} / {j['float']['top3']:.2%} | "
                     f"{j['quantized']['top1']:.2%} / {j['quantized']['top3']:.2%} |" for name, j in judged.items())
    positions = next(iter(judged.values()))["positions"]
    variants = next((j["precision_variants"] for j in reversed(list(judged.values())) if "precision_variants" in j), None)
    ways = ("\n\nOther ways to store the weights (the float network on the weights each gives the phone, same "
            "positions, last model above):\n\n| storage | top-1 agreement | stored bytes |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {v['top1_agreement']:.2%} | {v['stored_bytes']:,} |" for name, v in variants.items())
            if variants else "")
    return ("\n\nThe app model on trained weights (held-out windows, each model's own vocabulary, "
            f"{positions:,} positions):\n\n| weights | top-1 agreement with float | float top-1 / top-3 | "
            f"app model top-1 / top-3 |\n|---|---|---|---|\n{rows}" + ways)


def server(r: dict) -> str:
    q8 = [("8-bit updates ingested over HTTP (ceiling)",
           f"{r['ingest_updates_per_s_q8']:.1f} /s ({r['inprocess_updates_per_s_q8']:.0f} /s)")] \
        if "ingest_updates_per_s_q8" in r else []
    return _table([(f"check-ins/s, {n} concurrent devices (p99)",
                    f"{r['checkin_per_s'][n]:,.0f} ({r['checkin_p99_ms'][n]:.0f} ms)") for n in r["checkin_per_s"]]
                  + [("Gboard-size float32 updates ingested over HTTP", f"{r['ingest_updates_per_s']:.1f} /s"),
                     ("same, decoded and aggregated in-process (ceiling)", f"{r['inprocess_updates_per_s']:.0f} /s"),
                     *q8,
                     ("HTTP ingest / ceiling", f"{r['ingest_ratio']:.3f}"),
                     ("server peak RSS during a 1000-report round", f"{r['peak_rss_mb_1000_reports']:.0f} MB"),
                     ("gunicorn workers", r["workers"])])


def scale(r: dict) -> str:
    rows = "\n".join(f"| {name} | {b['max_rate_p99_100ms']:,} /s | {b['p50_ms_at_500']} / {b['p99_ms_at_500']} ms | "
                     f"{b['ingest_updates_per_s']:.1f} /s | {b['rss_mb_per_replica']:.0f} MB |"
                     for name, b in r["backends"].items())
    return ("| backend × replicas | highest open-loop check-in rate with p99 ≤ 100 ms | p50 / p99 at 500 /s | "
            "8-bit Gboard updates ingested | peak RSS per replica |\n|---|---|---|---|---|\n" + rows +
            f"\n\nA replica SIGKILLed mid-round (3 replicas): uploads accepted again through nginx after "
            f"{r['replica_kill_recovery_s']} s, the round completed {r['round_completed_after_kill_s']} s after the "
            f"kill with every update counted once. {r['workers_per_replica']} gunicorn workers × "
            f"{r['threads_per_worker']} threads per replica; load generator, nginx, PostgreSQL and every replica "
            f"share this machine's {r['cores']} cores, so more replicas cannot be faster here: size a deployment "
            "from the per-replica figures (Bonawitz et al. 2019: about 10k devices connected at a time).")


def compression(r: dict) -> str:
    from benchmarks.compression import table

    v, verdict, c = r["variants"], r["verdicts"], r["config"]
    missed = [k for k, ok in verdict["met"].items() if not ok]
    return (table(r) + "\n\n" + f"Same seed, {r['rounds']} rounds × {c['clients_per_round']} clients, client "
            f"SGD lr {c['client_lr']} (step clip {c['client_clip_norm']}), server {c['server_optimizer']} "
            f"{c['server_lr']} decayed over the last {c['server_lr_decay_rounds']} rounds; update clip "
            f"{v['f32']['clip_norm']} (clipped: {v['f32']['clipped_fraction']:.1%} of updates), weight cap "
            f"{v['f32']['max_weight']}. 8 bits are {verdict['q8_top1_points_below_f32']:+.2f} and 4 bits "
            f"{verdict['q4_top1_points_below_f32']:+.2f} top-1 points from float32 (positive: below). "
            + (f"Targets missed: {', '.join(missed)}." if missed else "Every target is met.")
            + " Plot: [compression.png](results/compression.png).")


def device(r: dict) -> str:
    rows = [("plan", f"{r.get('config')} ({r.get('parameters', 0):,} weights), {r.get('litert_threads')} LiteRT thread(s)")]
    for name in ("cold_task", "warm_task"):
        t = r.get(name)
        if t:
            rows.append((name.replace("_", " "), f"download {t['download_s']:.2f} s, prepare {t['prepare_s']:.2f} s, "
                         f"train {t['train_s']:.2f} s ({t['batches']} batches, {t['train_ms_per_batch']:.0f} ms each), "
                         f"upload {t['upload_s']:.2f} s"))
    if "device_rss_growth_mib" in r:
        rows.append(("memory growth of a task (runtime's estimate)",
                     f"{r['device_rss_growth_mib']:.0f} MiB ({r.get('task_memory_estimate_mib', 0):.0f} MiB)"))
    return _table(rows)


def fleet(r: dict) -> str:
    return _table([("largest fleet run", f"{r['max_phones']:,} phones" if r.get("max_phones") else "—"),
                   ("reports per completed round (selected)", f"{r['phones_per_round']:,.0f} ({r.get('selected_per_round', 0):,.0f})"),
                   ("wall time per round (opening → new version)", f"{r['wall_s_per_round']:.1f} s"),
                   ("rounds per simulated night (8 h)", f"{r['rounds_per_simulated_night']:.1f}"),
                   ("simulated / wall time", f"{r.get('simulated_hours', 0):.1f} h at ×{r.get('clock_speed', 0):.0f}"
                                             f" in {r.get('fleet_wall_s', 0):.0f} s"),
                   ("model", f"{r.get('model')} (coordination at scale; on-device compute: the device section)")]) + (
        "\n\nThe emulation is bound by this machine's CPU, not by the protocol: at ×"
        f"{r.get('clock_speed', 0):.0f} each round's {r['wall_s_per_round']:.0f} s of wall time is "
        f"{r['wall_s_per_round'] * r.get('clock_speed', 0) / 60:.0f} simulated minutes, which is what "
        "limits the rounds per night here; real phones train in parallel, so on a real clock a round "
        "takes its selection window plus the slowest selected phone's task.")


def _loss_change(r: dict) -> str | None:
    if "loss" in r["initial"] and "loss" in r["final"]:
        return f"{r['initial']['loss']:.2f} → {r['final']['loss']:.2f}"
    return None


def _loss(r: dict) -> str:
    change = _loss_change(r)
    return f", loss {change}" if change else ""


def demo(r: dict) -> str:
    rows = [("wall time", f"{r['wall_s'] / 60:.1f} min"), ("phones", r.get("phones")),
            ("training rounds completed", r["rounds"]), ("app-model versions published", r["published_versions"]),
            ("held-out top-1 / top-3, initial model", f"{_pct(r['initial']['top1'])} / {_pct(r['initial']['top3'])}"),
            (f"held-out top-1 / top-3, final model (version {r.get('final_version', '?')})",
             f"{_pct(r['final']['top1'])} / {_pct(r['final']['top3'])}")]
    if _loss_change(r):
        rows.append(("held-out loss, initial → final", _loss_change(r)))
    if r.get("eval_windows"):
        rows.append(("held-out windows evaluated", f"{r['eval_windows']:,} (fixed seeded sample of the held-out clients)"))
    return _table(rows) + ("\n\nPlots (written by `make demo`, not kept in git): "
                           "[quality per version](results/demo_quality.png), "
                           "[participation per simulated hour](results/demo_participation.png).")


def fuzz(r: dict) -> str:
    busiest = sorted(r["per_operation"].items(), key=lambda kv: -kv[1])
    rows = "\n".join(f"| `{op}` | {n:,} |" for op, n in busiest if n > 1)
    single = sum(1 for _, n in busiest if n == 1)
    checks = r.get("checks", [])
    phases = ", ".join(f"{name} {status}" for name, status in r.get("phases", {}).items())
    return (f"{r['cases']:,} schemathesis cases against the live server from its own `/openapi.json` in "
            f"{r['wall_s']:.0f} s (every check — {len(checks)}: {', '.join(checks)} —; phases {phases}; "
            f"seed {r['seed']}): **{r.get('failed_checks', 'n/a')} failed checks, {r['server_errors']} × 5xx, "
            f"{r['schema_violations']} schema violations**; the stateful phase followed "
            f"{r['stateful_transitions']} links, {r['full_chains']} of them completing register → check-in "
            f"→ upload.\n\n| operation | cases |\n|---|---|\n{rows}\n\n"
            f"(and {single} undocumented method-path pairs tried once each: 405)")


def secagg(r: dict) -> str:
    from benchmarks.secagg import table

    big = r["rounds"].get("1000")
    verdict = ""
    if big:
        t = r["targets"]
        verdict = (f"\n\nTargets at 1,000 devices: keys, shares and reveals {100 * big['key_share_fraction']:.2f}% of the "
                   f"masked upload (target ≤ {100 * t['key_share_fraction_1000']:.0f}%); unmasking with 30% dropout "
                   f"{big['unmask_s']['0.3']:.1f} s (target ≤ {t['unmask_s_1000_30pct']:.0f} s). Anchor: Bonawitz et al. "
                   "2017 measured 1.73x at 2^10 users for 16-bit values, where the bound m/b is 26/16 = 1.63x; at 8 "
                   f"bits the same round size makes it {big['expansion_bound']:.2f}x, and Nightjar's upload is "
                   f"{big['expansion'] / big['expansion_bound']:.3f} of its bound.")
    return (table(r) + "\n\nGboard model ({:,} weights) at {} bits, rotated; per-device CPU is thread time of the "
            "device's cryptography (its quantization, {} ms at 1,000, is the pipeline's), the unmasking the server's "
            "wall time, checked bit for bit against the plain sum.".format(
                r["size"], r["bits"], big["encode_ms"] if big else "?") + verdict)


def discovery(r: dict) -> str:
    rows = "\n".join(f"| {m} | {f:,} | {p:.3f} | {rc:.3f} | {n} | {pp:,} |" for m, f, p, rc, n, pp in zip(
        r["min_devices"], r["found"], r["precision"], r["recall"], r["rounds_each"], r["participations_each"]))
    o, d = r["oov_rate"], r["dp"]
    dp = (f"ε = {d['epsilon']:.1f}, δ = {d['delta']:.1e}: {d['found']} words found" if d["epsilon"] is not None
          else "no (ε, δ) applies")
    return (f"TrieHH over the {r['devices']} training users in simulation (contract.tasks.discovery, as phones and server "
            f"run it), {r['votes_per_device']} votes per device per level, {r['passes']} passes; precision and "
            f"recall of the first {r['top_k']:,} words found against the users' true top {r['top_k']:,} "
            f"out-of-vocabulary words by number of devices.\n\n| min_devices | words found | precision | recall | "
            f"rounds | participations |\n|---|---|---|---|---|---|\n{rows}\n\nWords revealed that fewer than "
            f"min_devices devices typed: **{r['revealed_below_threshold']}**. Held-out OOV rate: public vocabulary "
            f"{o['public']:.2%} → {o['after_discovery']:.2%} with the discovered words (users' vocabulary "
            f"{o['user_vocab']:.2%}): {r['oov_gap_cut']:.0%} of the gap closed (target ≥ 50%). In TrieHH's DP regime "
            f"(one vote per device, {d['devices_per_level']} devices sampled per level, {d['passes']} passes, "
            f"min_devices {d['min_devices']}): {dp}; with 905 users the regime that gives a meaningful ε finds "
            f"nothing (Zhu et al. evaluate it on millions of users).")


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def hostile(r: dict) -> str:
    rows = "\n".join(
        f"| {a['name']} | {'yes' if a['secure_aggregation'] else 'no'} | "
        f"{', '.join(f'{s}: {n}' for s, n in sorted(a['answers'].items()))} | {a['server_errors']} | "
        f"{a['round_outcome']} | {'yes' if a['next_round_completed'] else 'no'} | "
        f"{_ratio(a['step_ratio'])} |" for a in r["attacks"])
    bounds = "; ".join(f"{b['round']} ({b['reports']} reports, {b['weighting']}): {b['ratio']:.1f}×"
                       for b in r.get("largest_step_bound", []))
    s = r["slow_clients"]
    return ("| attack | secure | answers | 5xx | round | next round | step / honest |\n|---|---|---|---|---|---|---|\n"
            f"{rows}\n\nThe most one modified phone can move the mean after the plausibility checks, over an honest "
            f"round's step (contract.secagg.plausible.largest_step): {bounds}.\n\nSlow clients: "
            f"{s['stalled_connections']} stalled connections, {s['honest_completed']}/{s['honest_checkins']} honest "
            f"check-ins completed, p99 {s['honest_p99_ms']:.0f} ms, /healthz "
            f"{'answered' if s['health_answered'] else 'NOT answered'}.")


def fleet_ftrl(r: dict) -> str:
    f = r["dp_ftrl"]
    return (fleet(r) + f"\n\nUnder DP-FTRL's participation rule (b = {f['b']}, k = {f['k']} per {f['horizon']} "
            f"rounds, tree restarts every {f['restart_every']}): {f['refused']:,} of {f['checked']:,} check-ins "
            f"({f['refused_fraction']:.0%}) turned away; {r['rounds_completed']} training rounds completed and "
            f"{r['rounds_failed']} failed; ε {f['epsilon']:.1f} after {f['released']} releases (tiny model, "
            f"no projection: the noise of these rounds themselves).")


SECTIONS: dict[str, tuple[str, str, Callable[[dict], str]]] = {
    "quality": ("Model quality: n-gram vs central vs federated CIFG", "make bench-quality", quality),
    "compression": ("Update compression: 32, 8 and 4 bits", "make bench-compression", compression),
    "export": ("LiteRT plan and app model (Gboard config)", "make bench-export", export),
    "server": ("Server under load (gunicorn, loopback)", "make bench-server", server),
    "scale": ("Replicas on PostgreSQL behind nginx", "make bench-scale", scale),
    "device": ("One phone's task, Gboard-size plan", "make bench-device", device),
    "fleet": ("Emulated fleet at scale", "make bench-fleet", fleet),
    "fleet_ftrl": ("The fleet under DP-FTRL's participation rule",
                   "python -m benchmarks.fleet --ftrl-separation 8 --ftrl-participations 3 --ftrl-horizon 24 "
                   "--out benchmarks/results/fleet_ftrl.json", fleet_ftrl),
    "hostile": ("One hostile phone, and slow clients", "make bench-hostile", hostile),
    "demo": ("The demo: the whole system end to end", "make demo", demo),
    "fuzz": ("Fuzzing the protocol (schemathesis)", "make fuzz", fuzz),
    "secagg": ("Secure aggregation (SecAgg+)", "make bench-secagg", secagg),
    "discovery": ("Federated discovery of new words (TrieHH)", "make bench-discovery", discovery),
    "dp": ("Differential privacy: quality against ε", "make bench-dp", dp),
    "attacks": ("Attacks and defences", "make bench-attacks", attacks),
    "personalization": ("Personalization and fairness", "make bench-personalization", personalization),
}


def headline(results: dict[str, dict]) -> str:
    """The README's table: one line per benchmark."""
    lines = ["| benchmark | headline | from |", "|---|---|---|"]
    q, e, s, d, f, m = (results.get(k) for k in ("quality", "export", "server", "device", "fleet", "demo"))
    c = results.get("compression")
    if q:
        r = q["results"]
        public = [n for n in ("federated_pretrained", "federated_pretrained_discovery") if n in r]
        if "shipped_predictor" in r and "federated_pretrained_dropout" in r:
            s, net = r["shipped_predictor"], r["federated_pretrained_dropout"]
            lines.append(f"| quality (held-out) | shipped predictor ({s['combines']}): top-1 {_pct(s['top1'])}, top-3 "
                         f"{_pct(s['top3'])}; the federated network alone {_pct(net['top1'])}; users'-vocabulary "
                         f"n-gram {_pct(r['ngram']['top1'])} | `make bench-quality` |")
        elif public:
            best = max(public, key=lambda n: r[n]["top1"])
            label = "federated from public pretraining" + (" + discovered words" if best.endswith("discovery") else "")
            lines.append(f"| quality (held-out) | {label}: top-1 {_pct(r[best]['top1'])}, top-3 "
                         f"{_pct(r[best]['top3'])}; pretrained only {_pct(r['pretrained']['top1'])}; users'-vocabulary "
                         f"n-gram {_pct(r['ngram']['top1'])} | `make bench-quality` |")
        else:
            fed = r["federated"]
            lines.append(f"| quality (held-out) | federated CIFG top-1 {_pct(fed['top1'])}, top-3 {_pct(fed['top3'])} "
                         f"(n-gram top-1 {_pct(r['ngram']['top1'])}) | `make bench-quality` |")
    if c:
        v = c["variants"]
        lines.append(f"| compression | upload {v['f32']['upload_bytes'] / 1e6:.2f} → {v['q8']['upload_bytes'] / 1e6:.2f}"
                     f" MB (8 bits) / {v['q4']['upload_bytes'] / 1e6:.2f} MB (4 bits); top-1 "
                     f"{_pct(v['f32']['top1'])} / {_pct(v['q8']['top1'])} / {_pct(v['q4']['top1'])}; HTTP ingest "
                     f"{c['verdicts']['ingest_ratio_q8_over_f32']:.1f}x at 8 bits | `make bench-compression` |")
    sa = results.get("secagg")
    if sa and "1000" in sa["rounds"]:
        r = sa["rounds"]["1000"]
        lines.append(f"| secure aggregation | 1,000 devices: upload {r['expansion']:.2f}x the plain 8 bits (bound "
                     f"{r['expansion_bound']:.2f}x), unmasking with 30% dropout {r['unmask_s']['0.3']:.0f} s | "
                     "`make bench-secagg` |")
    dv = results.get("discovery")
    if dv:
        lines.append(f"| discovery | held-out OOV {dv['oov_rate']['public']:.2%} → {dv['oov_rate']['after_discovery']:.2%} "
                     f"({dv['oov_gap_cut']:.0%} of the gap to a users' vocabulary), "
                     f"{dv['revealed_below_threshold']} words below min_devices revealed | `make bench-discovery` |")
    if e:
        lines.append(f"| export | app model {e['app_model_bytes'] / 1e6:.2f} MB, suggestion p50 "
                     f"{e['suggest_ms_p50']:.2f} ms, train step {e['train_step_ms_median']:.0f} ms | `make bench-export` |")
    if s:
        q8 = f", {s['ingest_updates_per_s_q8']:.0f}/s at 8 bits" if "ingest_updates_per_s_q8" in s else ""
        lines.append(f"| server | {s['checkin_per_s']['1000']:,.0f} check-ins/s at 1000 devices, "
                     f"{s['ingest_updates_per_s']:.0f} float32 Gboard updates/s ingested{q8} | `make bench-server` |")
    if d and d.get("warm_task"):
        t = d["warm_task"]
        lines.append(f"| device | Gboard task on {d.get('client_windows', '?')} windows: train {t['train_s']:.1f} s, "
                     f"upload {t['upload_s']:.2f} s | `make bench-device` |")
    if f:
        lines.append(f"| fleet | {f['max_phones']:,} phones, {f['phones_per_round']:,.0f} per round, "
                     f"{f['wall_s_per_round']:.0f} s per round, {f['rounds_per_simulated_night']:.1f} rounds per "
                     f"simulated night | `make bench-fleet` |")
    if m:
        lines.append(f"| demo | {m.get('phones')} phones, {m['rounds']} rounds, {m['published_versions']} versions "
                     f"published; held-out top-1 {_pct(m['initial']['top1'])} → {_pct(m['final']['top1'])}, top-3 "
                     f"{_pct(m['initial']['top3'])} → {_pct(m['final']['top3'])}{_loss(m)} in "
                     f"{m['wall_s'] / 60:.0f} min | `make demo` |")
    a = results.get("attacks")
    if a and "clean" in a:
        full = [x for x in a["runs"] if x["attacker_fraction"] >= 0.1 and set(x["defences"]) == {"clip", "dp"}]
        if full:
            worst = max(full, key=lambda x: (x["backdoor_success"], -x["top1"]))
            lines.append(f"| attacks | 10% attackers, clip + DP: top-1 {_pct(worst['top1'])} (clean {_pct(a['clean']['top1'])}),"
                         f" backdoor {max(x['backdoor_success'] for x in full):.0%} over {len(full)} attacks | "
                         "`make bench-attacks` |")
    pz = results.get("personalization")
    if pz:
        chosen_on = "chosen on training users" if pz.get("selection") == "training users" else "in-sample"
        lines.append(f"| personalization | {pz['users']} held-out users ({chosen_on}): mean top-1 "
                     f"{_pct(pz['global']['top1'])} → {_pct(pz['personal']['top1'])} ({pz['relative_gain']:+.1%}"
                     + (f", micro {pz['micro_gain']:+.1%}" if "micro_gain" in pz else "")
                     + f"), {pz['hurt']:.0%} hurt, p10 {_pct(pz['global']['p10'])} → {_pct(pz['personal']['p10'])}; "
                     f"suggestion p50 {pz['suggest_ms_p50']:.2f} ms | `make bench-personalization` |")
    lines.append("")
    lines.append("Details and the machine: [benchmarks/REPORT.md](benchmarks/REPORT.md) (`make report`).")
    return "\n".join(lines)


def load_results(results_dir: Path = RESULTS) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def written_at(path: Path) -> dt.datetime:
    """When a results file was written: its last commit's time if git holds it unchanged (a clone or
    checkout resets every file's mtime), else the file's mtime."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", path.name], cwd=path.parent,
                                capture_output=True, text=True, timeout=10)
        if status.returncode == 0 and not status.stdout.strip():
            log = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path.name], cwd=path.parent,
                                 capture_output=True, text=True, timeout=10)
            if log.returncode == 0 and log.stdout.strip():
                return dt.datetime.fromtimestamp(int(log.stdout.strip()), dt.timezone.utc)
    except (OSError, subprocess.SubprocessError):
        pass
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)


def render(results: dict[str, dict], results_dir: Path = RESULTS) -> str:
    m = machine()
    pk = m["packages"]
    out = ["# Nightjar benchmarks", "",
           f"Generated by `make report` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from "
           "`benchmarks/results/*.json`; `make bench` reruns every benchmark first.", "",
           "## Machine", "",
           _table([("CPU", m["cpu"]), ("cores", m["cores"]), ("memory", f"{m['memory_gib']} GiB"),
                   ("OS", m["os"]), ("Python", m["python"]),
                   ("TensorFlow / TFF / LiteRT", f"{pk['tensorflow']} / {pk['tensorflow-federated']} / "
                                                 f"{pk['ai-edge-litert']}"),
                   ("NumPy / Flask / gunicorn", f"{pk['numpy']} / {pk['flask']} / {pk['gunicorn']}")]),
           "",
           "The cores are shared by everything a benchmark runs (server, phones, TFF): figures are "
           "indicative, and a busy machine makes them worse. Each JSON file keeps its own details.", ""]
    for key, (title, target, fmt) in SECTIONS.items():
        out += [f"## {title}", ""]
        r = results.get(key)
        if r is None:
            out += [f"Not yet measured: run `{target}`.", ""]
            continue
        stamp = written_at(results_dir / f"{key}.json")
        try:
            body = fmt(r)
        except (KeyError, TypeError, ValueError) as e:   # an older or partial result file
            body = f"(could not read `{key}.json`: {type(e).__name__}: {e})"
        out += [body, "", f"_`{target}` → `benchmarks/results/{key}.json`, {stamp:%Y-%m-%d %H:%M} UTC._", ""]
    for key in sorted(set(results) - set(SECTIONS)):
        out += [f"## {key}", "", "```json", json.dumps(results[key], indent=2)[:4000], "```", ""]
    return "\n".join(out)


def update_readme(block: str, readme: Path = REPO / "README.md") -> bool:
    text = readme.read_text()
    new, n = re.subn(r"(<!-- bench:begin -->\n).*?(<!-- bench:end -->)",
                     lambda m: m.group(1) + block + "\n" + m.group(2), text, flags=re.S)
    if n:
        readme.write_text(new)
    return bool(n)


def main() -> None:
    results = load_results()
    (REPO / "benchmarks" / "REPORT.md").write_text(render(results))
    updated = update_readme(headline(results))
    print(f"wrote benchmarks/REPORT.md ({len(results)} result file(s): {', '.join(results) or 'none'})"
          + ("; README.md's benchmark table updated" if updated else ""))


if __name__ == "__main__":
    main()
