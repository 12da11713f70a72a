"""Personalization benchmark: a personal model per held-out user, and the users the global model serves worst.

`make bench-personalization` takes the best global model available — the
quality benchmark's federated model from public pretraining
(runs/bench-quality/federated_pretrained) if it was run, else a shorter
federated run from the same start (cached under the work directory) — and
exports its Gboard-size LiteRT training plan. Then, for each of the 226
held-out users, exactly what a phone's personalization evaluation does
(models.personalize → contract.tasks.personal.evaluate): the first 80% of the
user's windows adapt (fine-tuning through the plan's `personalize`
signature and the user's word cache; the adapt part's last 20% decides
whether to fall back to the global model), the last 20% score.

It writes `benchmarks/results/personalization.json` (the issue's format,
plus the variants: fine-tuning only, the cache only, both) and
`personalization.png` (per-user top-1 CDFs), and measures on this CPU the
device's personalization time for the median user and the latency of a
suggestion from the personal model (float plan, `next_probs`, plus the cache).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks import RESULTS, parse_config, write_result
from benchmarks.quality import FederatedConfig

REPO = Path(__file__).resolve().parents[1]
QUALITY_MODEL = REPO / "runs" / "bench-quality" / "federated_pretrained" / "final.safetensors"


@dataclasses.dataclass
class PersonalizationBench:
    epochs: int = 1                 # contract.tasks.personal.PersonalSpec of the main row
    lr: float = 0.05
    cache_weight: float = 0.1
    cache_smoothing: float = 1.0
    fallback_nats: float = 2.0
    personal_layers: str = "output_bias"   # comma-separated plan weights personalization trains ("": all)
    variants: bool = True           # also fine-tuning only and the cache only
    global_rounds: int = 60         # the fallback global model's federated rounds from pretraining
    checkpoint: str = ""            # a global model to start from ("": the best available)
    latency_contexts: int = 300
    seed: int = 0


def global_model(cfg: PersonalizationBench, corpus, model, work: Path) -> tuple[np.ndarray, str]:
    from contract.model.weights import load_checkpoint
    from models.pretrain import pretrain
    from models.simulate import run_simulation

    cached = work / "global" / "final.safetensors"
    for path in ([Path(cfg.checkpoint)] if cfg.checkpoint else [QUALITY_MODEL, cached]):
        if path.is_file():
            rounds = load_checkpoint(path)[2].get("round")
            return load_checkpoint(path)[1], (f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}"
                                              + (f" (round {rounds} of federated training from public pretraining)"
                                                 if path == cached else ""))
    if cfg.checkpoint:
        raise SystemExit(f"error: --checkpoint: no file at {cfg.checkpoint}")
    sim = dataclasses.replace(FederatedConfig(), rounds=cfg.global_rounds, eval_every=cfg.global_rounds,
                              server_lr_decay_rounds=int(cfg.global_rounds * 0.7)).simulation()
    run_simulation(corpus, model, sim, work / "global", initial=pretrain(model, corpus.vocab)[0])
    path = work / "global" / "final.safetensors"
    return load_checkpoint(path)[1], (f"{path.relative_to(REPO)} (round {cfg.global_rounds} of federated "
                                      "training from public pretraining)")


def latency(model, app, windows: np.ndarray, n: int) -> dict:
    """Suggestion latency of a personal model (PersonalModel.suggest, beside the app model `app`) on real
    contexts, ms."""
    from contract.model.text import PAD_ID

    rows = [w[w != PAD_ID] for w in windows]
    contexts = [list(r[:1 + i % max(len(r) - 1, 1)]) for i, r in ((i, rows[i % len(rows)]) for i in range(n))]
    for c in contexts[:10]:
        model.suggest(c, app)
    times = []
    for c in contexts:
        t0 = time.perf_counter()
        model.suggest(c, app)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.median(times)), "p99": float(np.percentile(times, 99)), "contexts": len(times),
            "mode": model.mode}


def latencies(manifest: Path, flat: np.ndarray, vocab, windows: np.ndarray, spec, n: int, work: Path) -> dict:
    """p50/p99 of personal suggestions both ways: the quantized app model + personal bias + cache, and the
    float plan with every layer personalized + cache."""
    from contract.tasks.personal import PersonalCache, personalize
    from device_runtime.personalization import personal_model
    from models.model import GBOARD
    from tflite_export import export_app_model, export_plan
    from tflite_export.reader import load_app_model, load_plan

    app = load_app_model(export_app_model(GBOARD, flat, vocab, work / "app"))
    cache = PersonalCache.from_windows(windows)
    out = {}
    for name, layers in (("app_model_bias_and_cache", ("output_bias",)), ("plan_all_layers_and_cache", None)):
        plan = load_plan(export_plan(GBOARD, flat, vocab, work / f"plan-{name}", personal_layers=layers))
        tuned = personalize(plan, flat, windows, dataclasses.replace(spec, epochs=max(spec.epochs, 1)))
        weights = tuned.flat if tuned.flat is not None else flat
        out[name] = latency(personal_model(plan, weights, flat, cache, spec, 0), app, windows, n)
    return out


def main() -> None:
    from contract.tasks.personal import PersonalSpec, personalize
    from models.corpus import load_corpus
    from models.model import GBOARD
    from models.personalize import evaluate_users, plot, report
    from models.tff_runtime import install_exit_handlers
    from tflite_export import export_plan
    from tflite_export.reader import load_plan

    install_exit_handlers()
    cfg, paths = parse_config(PersonalizationBench, __doc__, work_dir=REPO / "runs" / "bench-personalization")
    work = paths["work_dir"]
    corpus = load_corpus(vocab_size=GBOARD.vocab_size - 4, seq_len=GBOARD.seq_len)
    flat, source = global_model(cfg, corpus, GBOARD, work)
    layers = tuple(n for n in cfg.personal_layers.split(",") if n) or None
    manifest = export_plan(GBOARD, flat, corpus.vocab, work / "plan", personal_layers=layers)
    plan = load_plan(manifest)
    main_spec = PersonalSpec(cfg.epochs, cfg.lr, cfg.cache_weight, cfg.cache_smoothing,
                             cfg.fallback_nats).validate()
    specs = {"both": main_spec}
    if cfg.variants:
        specs["finetune_only"] = dataclasses.replace(main_spec, cache_weight=0.0)
        specs["cache_only"] = dataclasses.replace(main_spec, epochs=0)
    results = {}
    for name, spec in specs.items():
        rows = evaluate_users(plan, flat, corpus.heldout, spec, cfg.seed)
        results[name] = report(rows)
        if name == "both":
            main_rows = rows
            plot(rows, RESULTS / "personalization.png",
                 f"Personalization on {len(rows)} held-out users (fine-tuning + cache, fallback)")
        r = results[name]
        print(f"{name}: global {r['global']['top1']:.2%} → personal {r['personal']['top1']:.2%} "
              f"({r['relative_gain']:+.1%}), helped {r['helped']:.0%}, hurt {r['hurt']:.0%}, "
              f"p10 {r['global']['p10']:.2%} → {r['personal']['p10']:.2%}", flush=True)
    by_size = sorted(main_rows, key=lambda r: r.windows)
    median_user = by_size[len(by_size) // 2].user
    t0 = time.monotonic()
    personalize(plan, flat, corpus.heldout[median_user][:int(0.8 * len(corpus.heldout[median_user]))], main_spec,
                cfg.seed)
    finetune_s = time.monotonic() - t0
    lat = latencies(manifest, flat, corpus.vocab, corpus.heldout[median_user], main_spec, cfg.latency_contexts, work)
    main_lat = lat["app_model_bias_and_cache" if layers == ("output_bias",) or not main_spec.epochs
                   else "plan_all_layers_and_cache"]
    main = results["both"]
    out = {"users": main["users"],
           "global": {k: main["global"][k] for k in ("top1", "p10", "median", "below_half_mean", "micro_top1")},
           "personal": {k: main["personal"][k] for k in ("top1", "p10", "median", "below_half_mean", "micro_top1")},
           "relative_gain": main["relative_gain"], "helped": main["helped"], "hurt": main["hurt"],
           "fell_back": main["fell_back"], "finetune_s_median_user": finetune_s,
           "median_user_windows": len(corpus.heldout[median_user]),
           "suggest_ms_p50": main_lat["p50"], "suggest_ms_p99": main_lat["p99"], "suggest_ms": lat,
           "spec": dataclasses.asdict(main_spec), "personal_layers": list(layers) if layers else "all",
           "global_model": source, "variants": results, "config": dataclasses.asdict(cfg)}
    write_result(RESULTS / "personalization.json", out)


if __name__ == "__main__":
    main()
