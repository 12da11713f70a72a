"""The phone's personal model: the global model fitted to its user, kept on the phone only.

When the published app model says its population keeps personal models
(its `personalization` entry: the spec, the version's float weights and
the training plan), the runtime calls `Personalizer.refresh` during a step
in which the policy would let it train — the same window, charging and idle
— and again whenever a newer global version is published. `refresh`
fine-tunes and counts the cache (contract.tasks.personal.personalize), decides
whether to fall back to the global model, and stores the result under
`<data dir>/personal/` (written to a scratch directory and renamed into
place, so a crash leaves the old one or the new one). Nothing of it is ever
sent: the only personalization figures that leave a phone are a
personalization evaluation's summed counts (device_runtime.task).

`PersonalModel.suggest` serves the keyboard from the personal weights,
mixed with the cache: through the app model's own distribution when only
the output bias was personalized, else through the plan's `next_probs`.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract.model.metrics import suggestions
from contract.tasks.personal import PersonalCache, PersonalSpec, Personalized, mix, personalize
from contract.model.weights import load_checkpoint, save_checkpoint
from tflite_export.reader import TrainingPlan, load_plan

WEIGHTS, BIAS, CACHE, META = "weights.safetensors", "bias_delta.npy", "cache.json", "meta.json"


class PersonalModel:
    """Suggestions from personal weights and the user's cache.

    Where personalization moved only the output bias (a plan exported with
    `personal_layers = output_bias`, or no fine-tuning at all), the model
    part is the keyboard's own quantized app model — its whole distribution
    times exp(Δ bias), renormalized, which is exactly softmax(logits + Δ
    bias) — so a personal suggestion costs what a global one does. Any other
    layer moved, and the plan's `next_probs` computes it from the personal
    weights (float, a plan interpreter of its own).
    """

    def __init__(self, cache: PersonalCache | None, spec: PersonalSpec, base_version: int, vocab_sha256: str,
                 *, plan: TrainingPlan | None = None, bias_delta: np.ndarray | None = None, k: int = 3):
        self.cache, self.spec, self.base_version, self.k = cache, spec, base_version, k
        self.vocab_sha256 = vocab_sha256      # the vocabulary it speaks: the app model's must be the same
        self.plan, self.bias_delta = plan, bias_delta
        self.mode = "plan" if plan is not None else "app"

    def probabilities(self, token_ids: Sequence[int], app=None) -> np.ndarray:
        """The personal next-word distribution [V] after `token_ids` (starting with <bos>); `app` is the
        current app model (tflite_export.reader.AppModel), needed in the "app" mode."""
        if self.plan is not None:
            p = self.plan.next_probs(token_ids)
        else:
            p = np.asarray(app.probabilities(token_ids), np.float64)
            if self.bias_delta is not None:
                p = p * np.exp(self.bias_delta)
                p /= p.sum()
        return mix(p, int(token_ids[-1]), self.cache, self.spec)

    def suggest(self, token_ids: Sequence[int], app=None) -> list[tuple[int, float]]:
        """The k best (id, probability), never pad/bos/oov, as AppModel.suggest answers."""
        p = self.probabilities(token_ids, app)
        return [(int(i), float(p[i])) for i in suggestions(p, self.k)]


def bias_delta(layout, flat: np.ndarray, global_flat: np.ndarray) -> np.ndarray | None:
    """How far personalization moved the output bias, if nothing else moved (None: other layers did)."""
    delta = np.asarray(flat, np.float64) - np.asarray(global_flat, np.float64)
    bias = next(e for e in layout.entries if e.name == "output_bias")
    if np.any(delta[:bias.offset]) or np.any(delta[bias.offset + bias.size:]):
        return None
    return delta[bias.offset:bias.offset + bias.size]


def personal_model(plan: TrainingPlan, flat: np.ndarray, global_flat: np.ndarray, cache: PersonalCache | None,
                   spec: PersonalSpec, base_version: int, k: int = 3) -> PersonalModel:
    """The PersonalModel of weights `flat` fine-tuned from `global_flat`: the "app" mode when only the output
    bias moved, else the "plan" mode (`plan` is then set to `flat` and kept)."""
    delta = bias_delta(plan.layout, flat, global_flat)
    if delta is None:
        plan.set_weights(flat)
        return PersonalModel(cache, spec, base_version, plan.vocab.sha256, plan=plan, k=k)
    return PersonalModel(cache, spec, base_version, plan.vocab.sha256, bias_delta=delta if delta.any() else None,
                         k=k)


class Personalizer:
    """A phone's personal model on disk: made, replaced and loaded here."""

    def __init__(self, data_dir: str | Path, num_threads: int | None = 1):
        self.dir = Path(data_dir) / "personal"
        self.num_threads = num_threads
        self._meta: dict | None = None      # read once: `due` runs at every step of the runtime

    def meta(self) -> dict | None:
        """What the stored personal model was made from (None: none is stored)."""
        if self._meta is None:
            try:
                self._meta = json.loads((self.dir / META).read_text())
            except (OSError, ValueError):
                return None
        return self._meta

    def due(self, version: int) -> bool:
        """Whether global version `version` has not been personalized yet (kept or fallen back)."""
        meta = self.meta()
        return meta is None or meta.get("base_version") != version

    def refresh(self, plan_manifest: Path, checkpoint: Path, windows: np.ndarray, spec: PersonalSpec,
                version: int, seed: int = 0) -> Personalized:
        """Personalize global `version` (its checkpoint and the plan) on the phone's `windows`."""
        plan = load_plan(plan_manifest, num_threads=self.num_threads)
        _, flat, _ = load_checkpoint(checkpoint)
        t0 = time.monotonic()
        result = personalize(plan, flat, windows, spec, seed)
        g, p = result.validation
        delta = None if result.fell_back else bias_delta(plan.layout, result.flat, flat)
        meta = {"base_version": int(version), "fell_back": result.fell_back, "spec": spec.to_json(),
                "mode": None if result.fell_back else ("plan" if delta is None else "app"),
                "vocab_sha256": plan.vocab.sha256, "plan": f"plan/{Path(plan_manifest).name}",
                "seconds": time.monotonic() - t0, "windows": int(len(windows)),
                "validation": {"global_top1": g.top1, "personal_top1": p.top1, "positions": g.positions}}
        scratch = self.dir.with_name("personal.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        if meta["mode"] == "plan":   # its own copy of the plan: the runtime keeps only the current one
            shutil.copytree(Path(plan_manifest).parent, scratch / "plan")
            save_checkpoint(scratch / WEIGHTS, plan.layout, result.flat, {"base_version": int(version)})
        elif meta["mode"] == "app":  # the app model serves it: only the bias it moved is kept
            np.save(scratch / BIAS, delta)
        if not result.fell_back:
            (scratch / CACHE).write_text(json.dumps(result.cache.to_json() if result.cache else None))
        (scratch / META).write_text(json.dumps(meta))
        old = self.dir.with_name("personal.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        scratch.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)
        self._meta = meta
        return result

    def load(self, k: int = 3) -> PersonalModel | None:
        """The stored personal model (None: none, a fallback, or files that do not load)."""
        meta = self.meta()
        if meta is None or meta.get("fell_back"):
            return None
        try:
            cache_json = json.loads((self.dir / CACHE).read_text())
            cache = PersonalCache.from_json(cache_json) if cache_json else None
            spec, version, vocab = PersonalSpec.from_json(meta["spec"]), meta["base_version"], meta["vocab_sha256"]
            if meta["mode"] == "app":
                delta = np.load(self.dir / BIAS)
                return PersonalModel(cache, spec, version, vocab, bias_delta=delta if delta.any() else None, k=k)
            plan = load_plan(self.dir / meta["plan"], num_threads=self.num_threads)
            plan.set_weights(load_checkpoint(self.dir / WEIGHTS)[1])
            return PersonalModel(cache, spec, version, vocab, plan=plan, k=k)
        except (OSError, ValueError, KeyError):
            return None
