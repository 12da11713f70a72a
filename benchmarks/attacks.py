"""Attack benchmark: what a minority of protocol-following attackers does, with and without defences.

`make bench-attacks` runs the quality benchmark's federated setting — the
configuration we ship (benchmarks.quality.FederatedConfig: its server
optimizer, client training with dropout, from the model pretrained on public
text with dropout, public vocabulary) — over fewer rounds (Gboard-size
model), with 1%, 5% and 10% of each round's clients attacking (models.attacks),
and measures the held-out top-1 (the same metric and users as `make
bench-quality`) and the backdoor's success (the fraction of trigger
contexts whose first suggestion is the attacker's word):

* attacks: model replacement with a semantic backdoor ("the king is" →
  "gold"); a Sybil party's coordinated backdoor at an honest-looking norm;
  sign-flipped updates scaled x10 (untargeted);
* defences, alone and together: the update pipeline's clip and weight cap
  ("clip"), DP noise at a Gboard-scale projection ("dp", contract.dp.noise),
  zeroing of updates above 3x the last round's median norm ("zeroing",
  contract.update.robust; plain rounds only) and a coordinate-wise trimmed mean
  ("robust"; neither combines with secure aggregation nor with DP); "all"
  is every defence that composes with secure aggregation (clip + dp),
  "plain_all" every one of a plain round (clip + zeroing); "none" turns the
  clip and the cap off (float32 updates, no bound).

An adaptive server step undoes norm bounding: Adam moves every coordinate by
about its learning rate whatever the update's size, so a clipped attacker
still owns the coordinates honest clients leave alone. `--server-optimizer
adam` measures that (the runs of such a setting are kept under
`adaptive_server` in attacks.json).

Attackers join from round 2, so that zeroing has a round's median. Each
run's figures are written to attacks.json as it ends; runs of an earlier
attacks.json with the same setting are kept (`--single-fractions` chooses at
which fractions each defence runs alone; none and all run at every one).

Results: `benchmarks/results/attacks.json` (the issue's format).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import RESULTS, parse_config, same_setting, write_result
from benchmarks.quality import FederatedConfig

REPO = Path(__file__).resolve().parents[1]
DEFENCES = {"none": (), "clip": ("clip",), "zeroing": ("zeroing",), "dp": ("dp",), "robust": ("robust",),
            "all": ("clip", "dp"), "plain_all": ("clip", "zeroing")}
SINGLE = ("clip", "zeroing", "dp", "robust", "plain_all")


@dataclasses.dataclass
class AttackBenchConfig(FederatedConfig):
    rounds: int = 20                           # the shipped server optimizer ("adam" shows the adaptive step's weakness)
    server_lr_decay_rounds: int = 12
    eval_every: int = 20
    model: str = "gboard"
    fractions: str = "0.1,0.05,0.01"
    single_fractions: str = "0.1"                # where each defence runs alone (none, all: every fraction)
    attacks: str = "model_replacement,sybil,sign_flip"   # sybil and sign flips: the largest fraction only
    zeroing: float = 3.0                        # "zeroing": x the last round's median norm
    dp_noise_multiplier: float = 1.0            # projected to Gboard's scale: N = 10^6, m = 6,500
    clip_norm: float = 1.0                      # "clip": the population default's order, from pretrained


def update_for(defences: tuple[str, ...], cfg: AttackBenchConfig):
    from contract.update.spec import UpdateSpec

    zeroing = cfg.zeroing if "zeroing" in defences else 0.0
    if "robust" in defences:
        return UpdateSpec(bits=8, clip_norm=1e6, weighting="uniform", max_weight=10**6, aggregator="trimmed_mean")
    if "clip" in defences:
        return UpdateSpec(bits=8, clip_norm=cfg.clip_norm, zeroing=zeroing).scaled_to_epochs(cfg.local_epochs)
    return UpdateSpec(bits=32, clip_norm=1e6, max_weight=10**6, zeroing=zeroing)


def plan(cfg: AttackBenchConfig) -> list[tuple[str, float, str]]:
    """(attack, fraction, defence name) of every run, the most telling first: no defence and all of
    them for every attack and fraction, then each defence alone."""
    fractions = sorted((float(f) for f in cfg.fractions.split(",")), reverse=True)
    singles = {float(f) for f in cfg.single_fractions.split(",") if f}
    attacks = cfg.attacks.split(",")
    pairs = [(a, f) for a in attacks for f in (fractions if a == "model_replacement" else fractions[:1])]
    out = [(a, f, name) for a, f in pairs for name in ("all", "none")]
    out += [(a, f, name) for a, f in pairs if a == "model_replacement" and f in singles for name in SINGLE]
    out += [(a, f, "plain_all") for a, f in pairs if a == "sybil"]     # the one a Sybil is built to evade
    return out


def run_key(attack: str, fraction: float, name: str) -> str:
    return f"{attack}-{fraction:g}-{name}"


def run(cfg: AttackBenchConfig, work: Path, earlier: dict | None = None, save=None) -> dict:
    """The clean run and every planned one; `save(report)` after each, so a stopped run keeps its figures."""
    from contract.dp.noise import DPSpec
    from models.attacks import AttackConfig
    from models.corpus import load_corpus
    from models.model import CONFIGS
    from benchmarks.quality_shipped import pretrain_config
    from models.pretrain import pretrain
    from models.simulate import run_simulation

    model = CONFIGS[cfg.model]
    corpus = load_corpus(vocab_size=model.vocab_size - 4, seq_len=model.seq_len)
    initial = pretrain(model, corpus.vocab, pretrain_config(cfg))[0]
    base = FederatedConfig(**{k: v for k, v in dataclasses.asdict(cfg).items()
                              if k in dataclasses.asdict(FederatedConfig())})
    same = bool(earlier) and same_setting(cfg, earlier.get("config"),
                                            ignore=("single_fractions", "fractions", "attacks"))
    old = {r["key"]: r for r in earlier.get("runs", [])} if same else {}
    clean = (earlier["clean"] if same else
             run_simulation(corpus, model, base.simulation(), work / "clean", initial=initial)["final"])
    clean, runs = {"top1": clean["top1"], "top3": clean["top3"]}, []
    if save:
        save({"config": dataclasses.asdict(cfg), "clean": clean, "runs": runs})
    for attack, fraction, name in plan(cfg):
        key = run_key(attack, fraction, name)
        if key in old:
            runs.append(old[key])
            continue
        defences = DEFENCES[name]
        dp = (DPSpec(noise_multiplier=cfg.dp_noise_multiplier, initial_clip=cfg.clip_norm)
              if "dp" in defences else None)
        sim = base.simulation(update=update_for(defences, cfg), dp=dp,
                              dp_deploy_reports=6500 if dp else None, dp_population=10**6 if dp else None,
                              attack=AttackConfig(attack, fraction, start_round=2))
        summary = run_simulation(corpus, model, sim, work / key, initial=initial)
        final = summary["final"]
        runs.append({"key": key, "attack": attack, "attacker_fraction": fraction, "defences": list(defences),
                     "top1": final["top1"], "top3": final["top3"], "backdoor_success": final["backdoor_success"],
                     "canary": summary.get("canary")})
        print(f"{key}: top-1 {final['top1']:.4f}, backdoor {final['backdoor_success']:.0%}", flush=True)
        if save:
            save({"config": dataclasses.asdict(cfg), "clean": clean, "runs": runs})
    return {"config": dataclasses.asdict(cfg), "clean": clean, "runs": runs}


def main() -> None:
    from models.tff_runtime import install_exit_handlers

    install_exit_handlers()
    cfg, paths = parse_config(AttackBenchConfig, __doc__, work_dir=REPO / "runs" / "bench-attacks")
    path = RESULTS / "attacks.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if cfg.server_optimizer == "adam":      # the adaptive step's runs live beside the main ones
        keep = {k: v for k, v in earlier.items() if k != "adaptive_server"}
        save = lambda part: write_result(path, {**keep, "adaptive_server": part}, show=False)   # noqa: E731
        save(run(cfg, paths["work_dir"], earlier.get("adaptive_server"), save=save))
        return
    extra = {k: v for k, v in earlier.items() if k not in ("config", "clean", "runs")}   # fleet, adaptive_server
    save = lambda part: write_result(path, {**part, **extra}, show=False)   # noqa: E731
    save(run(cfg, paths["work_dir"], earlier, save=save))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
