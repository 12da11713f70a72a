"""`make bench-attacks`, the fleet part: the demo's deployment with a tenth of its phones attacking.

The demo's population (benchmarks/demo.py: the Gboard-size model from the
public-pretrained weights, the real server under gunicorn, secure
aggregation, distributed DP with the adaptive clip, unweighted means, the
minimum cohort, enrollment with attestation) and its fleet, in which
`--fraction` of the phones are one party's Sybils (emulation.attackers): it
enrolled them with the app's credential and valid attestation statements
(the deployment's issuer key stands for stolen or farmed ones) and
coordinates them — every one trains on the same backdoor ("the king is" →
"gold"), takes extra steps and boosts its update (model replacement), all
through the real protocol. Only the server's defences stand in its way.

`--defences none` runs the same fleet against a population without them
(no secure aggregation, no DP, float32 updates with no clip and no weight
cap), to show the damage.

It writes the `fleet` entry of `benchmarks/results/attacks.json` (keeping
the simulation's runs): held-out top-1 of the last version (the same 3,000
seeded held-out windows as the demo, whose clean run is the reference),
backdoor success of every evaluated version, what the server's standing
canary showed on each published version, and the attackers' accepted uploads.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from benchmarks import RESULTS, parse_config, write_result
from benchmarks.demo import POPULATION, POPULATION_SETTINGS, DemoConfig, prepare, run_fleet

REPO = Path(__file__).resolve().parents[1]

UNDEFENDED = dict(secure_aggregation=False, dp=None,
                  update={"bits": 32, "clip_norm": 1e6, "max_weight": 10**6, "weighting": "examples"})


@dataclasses.dataclass(frozen=True)
class AttackFleetConfig(DemoConfig):
    kind: str = "model_replacement"  # emulation.attackers.KINDS (sign_flip, scaled, random: untargeted)
    fraction: float = 0.1            # of the fleet's phones: the Sybil party's devices
    boost: float = 10.0              # model replacement: the trained delta times this
    repeat: int = 10                 # each training batch this many steps (the plan says one)
    copies: int = 8                  # each backdoor sentence this many times in an attacker's text
    defences: str = "all"            # "all": the demo's population; "none": UNDEFENDED
    published: int = 1


def settings(defences: str) -> dict:
    """The population's settings: the demo's, or the demo's without its defences."""
    if defences not in ("all", "none"):
        raise SystemExit("error: --defences must be 'all' or 'none'")
    merged = {**POPULATION_SETTINGS, **(UNDEFENDED if defences == "none" else {})}
    return {k: v for k, v in merged.items() if v is not None}


def run(cfg: AttackFleetConfig, out: Path) -> dict:
    import psutil

    from benchmarks.demo_report import evaluate_versions
    from emulation.attackers import FleetAttack
    from emulation.deployment import init_population
    from deploy.server_process import ServerProcess, free_port

    attack = FleetAttack(cfg.kind, cfg.fraction, cfg.boost, repeat=cfg.repeat, copies=cfg.copies)
    corpus, model, server_config = prepare(cfg, out, settings(cfg.defences))
    init_population(server_config, model, POPULATION)
    server = ServerProcess(server_config, free_port(), out / "server" / "server.log", workers=2, threads=8)
    t0 = time.monotonic()
    try:
        server.start()
        fleet, status, wall, _ = run_fleet(cfg, out, server, corpus, attack=attack)
        quality = evaluate_versions(server, status, model, corpus, cfg.eval_windows, out / "versions", cfg.seed)
        published = [{"version": v["version"], "canary": v.get("canary")}
                     for v in server.operator_get(f"/v1/populations/{POPULATION}/versions").json()["versions"]
                     if v.get("published_at")]
    finally:
        server.kill()
    for c in psutil.Process().children(recursive=True):
        if c.is_running():
            c.kill()
    bad = {i for i, p in enumerate(fleet.phones) if p.attack is not None}
    accepted = [u for u in fleet.uploads if u.status == "accepted"]
    success = backdoor_by_version(model.config, corpus.vocab, out / "versions", attack, quality["versions"])
    last = quality["versions"][-1]
    return {"defences": cfg.defences, "attacker_fraction": cfg.fraction, "phones": cfg.phones,
            "attackers": len(bad), "rounds": status.train_completed, "final_version": last["version"],
            "top1": last["heldout"]["top1"], "top3": last["heldout"]["top3"],
            "backdoor_success": success[-1]["backdoor_success"], "by_version": success,
            "uploads_accepted": len(accepted), "attacker_uploads_accepted": sum(u.phone in bad for u in accepted),
            "published_canary": published, "wall_s": round(time.monotonic() - t0, 1),
            "eval_windows": quality["windows"], "config": dataclasses.asdict(cfg)}


def backdoor_by_version(model_config, vocab, scratch: Path, attack, versions: list[dict]) -> list[dict]:
    """Backdoor success and held-out top-1 of every evaluated version (checkpoints in `scratch`)."""
    from contract.model.weights import load_checkpoint
    from models.attacks import Adversary, AttackConfig, backdoor_success

    adversary = Adversary(AttackConfig("backdoor", trigger=attack.trigger, target=attack.target), vocab,
                          model_config.seq_len, clients_per_round=1, server_lr=1.0)
    rows = []
    for v in versions:
        _, flat, _ = load_checkpoint(scratch / f"v{v['version']}.safetensors")
        rows.append({"version": v["version"], "published": v["published"], "top1": v["heldout"]["top1"],
                     "backdoor_success": backdoor_success(model_config, flat, adversary)})
    return rows


def main() -> int:
    from models.tff_runtime import install_exit_handlers

    install_exit_handlers()
    cfg, paths = parse_config(AttackFleetConfig, __doc__, out=REPO / "runs" / "bench-attack-fleet")
    out = paths["out"]
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    result = run(cfg, out)
    path = RESULTS / "attacks.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    name = cfg.defences if cfg.kind == "model_replacement" else f"{cfg.kind}-{cfg.defences}"
    fleet = {**report.get("fleet", {}), name: result}
    clean = RESULTS / "demo.json"
    if clean.is_file():
        fleet["clean_demo_top1"] = json.loads(clean.read_text())["final"]["top1"]
    write_result(path, {**report, "fleet": fleet}, show=False)
    print(f"fleet, {cfg.defences} defences, {result['attackers']} of {cfg.phones} phones attacking: "
          f"{result['rounds']} training rounds, last version {result['final_version']}: held-out top-1 "
          f"{result['top1']:.2%}" + (f" (the demo's clean run: {fleet['clean_demo_top1']:.2%})"
                                      if "clean_demo_top1" in fleet else "")
          + f"; backdoor success {result['backdoor_success']:.0%}; {result['attacker_uploads_accepted']} of "
          f"{result['uploads_accepted']} accepted uploads were the attackers'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
