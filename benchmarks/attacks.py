"""Attack benchmark: what a minority of protocol-following attackers does, with and without defences.

`make bench-attacks` runs the quality benchmark's federated setting over fewer
rounds (Gboard-size model, from the public-pretrained model, public
vocabulary) with 1%, 5% and 10% of each round's clients attacking
(models.attacks), and measures the held-out top-1 (the same metric and users
as `make bench-quality`) and the backdoor's success (the fraction of
trigger contexts whose first suggestion is the attacker's word):

* attacks: model replacement with a semantic backdoor ("the king is" →
  "gold"), and sign-flipped updates scaled x10 (untargeted);
* defences, alone and together: the update pipeline's clip and weight cap
  ("clip"), DP noise at a Gboard-scale projection ("dp", contract.dp),
  and a coordinate-wise trimmed mean ("robust", contract.robust; it cannot
  combine with secure aggregation, nor with DP); "none" turns the clip and
  the cap off (float32 updates, no bound).

Results: `benchmarks/results/attacks.json` (the issue's format).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import RESULTS, parse_config, write_result
from benchmarks.quality import FederatedConfig

REPO = Path(__file__).resolve().parents[1]
DEFENCES = {"none": (), "clip": ("clip",), "dp": ("dp",), "robust": ("robust",), "all": ("clip", "dp")}


@dataclasses.dataclass
class AttackBenchConfig(FederatedConfig):
    rounds: int = 60
    server_lr_decay_rounds: int = 40
    eval_every: int = 60
    model: str = "gboard"
    fractions: str = "0.01,0.05,0.1"
    defences: str = "none,clip,dp,robust,all"
    attacks: str = "model_replacement,sign_flip"  # sign flips run at the largest fraction only
    dp_noise_multiplier: float = 1.0            # projected to Gboard's scale: N = 10^6, m = 6,500
    clip_norm: float = 1.0                      # "clip": the population default's order, from pretrained


def update_for(defences: tuple[str, ...], cfg: AttackBenchConfig):
    from contract.update_spec import UpdateSpec

    if "robust" in defences:
        return UpdateSpec(bits=8, clip_norm=1e6, weighting="uniform", max_weight=10**6, aggregator="trimmed_mean")
    if "clip" in defences:
        return UpdateSpec(bits=8, clip_norm=cfg.clip_norm).scaled_to_epochs(cfg.local_epochs)
    return UpdateSpec(bits=32, clip_norm=1e6, max_weight=10**6)


def run(cfg: AttackBenchConfig, work: Path) -> dict:
    from contract.dp import DPSpec
    from models.attacks import AttackConfig
    from models.corpus import load_corpus
    from models.model import CONFIGS
    from models.pretrain import pretrain
    from models.simulate import run_simulation

    model = CONFIGS[cfg.model]
    corpus = load_corpus(vocab_size=model.vocab_size - 4, seq_len=model.seq_len)
    initial = pretrain(model, corpus.vocab)[0]
    base = FederatedConfig(**{k: v for k, v in dataclasses.asdict(cfg).items()
                              if k in dataclasses.asdict(FederatedConfig())})
    clean = run_simulation(corpus, model, base.simulation(), work / "clean", initial=initial)["final"]
    runs = []
    fractions = [float(f) for f in cfg.fractions.split(",")]
    for attack in cfg.attacks.split(","):
        for fraction in (fractions if attack == "model_replacement" else fractions[-1:]):
            for name in cfg.defences.split(","):
                defences = DEFENCES[name]
                dp = (DPSpec(noise_multiplier=cfg.dp_noise_multiplier, initial_clip=cfg.clip_norm)
                      if "dp" in defences else None)
                sim = base.simulation(update=update_for(defences, cfg), dp=dp,
                                      dp_deploy_reports=6500 if dp else None, dp_population=10**6 if dp else None,
                                      attack=AttackConfig(attack, fraction))
                final = run_simulation(corpus, model, sim, work / f"{attack}-{fraction:g}-{name}",
                                       initial=initial)["final"]
                runs.append({"attack": attack, "attacker_fraction": fraction, "defences": list(defences),
                             "top1": final["top1"], "top3": final["top3"],
                             "backdoor_success": final["backdoor_success"]})
                print(f"{attack} {fraction:.0%} {name}: top-1 {final['top1']:.4f}, backdoor "
                      f"{final['backdoor_success']:.0%}", flush=True)
    return {"config": dataclasses.asdict(cfg), "clean": {"top1": clean["top1"], "top3": clean["top3"]},
            "runs": runs}


def main() -> None:
    from models.tff_runtime import install_exit_handlers

    install_exit_handlers()
    cfg, paths = parse_config(AttackBenchConfig, __doc__, work_dir=REPO / "runs" / "bench-attacks")
    write_result(RESULTS / "attacks.json", run(cfg, paths["work_dir"]))


if __name__ == "__main__":
    main()
