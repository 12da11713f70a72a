"""The phone's personal model: the global model fitted to its user, kept on the phone only.

When the published app model says its population keeps personal models
(its `personalization` entry: the spec, the version's float weights and
the training plan), the runtime calls `Personalizer.refresh` during a step
in which the policy would let it train — the same window, charging and idle
— and again whenever a newer global version is published. `refresh`
fine-tunes and counts the cache (contract.personal.personalize), decides
whether to fall back to the global model, and stores the result under
`<data dir>/personal/` (written to a scratch directory and renamed into
place, so a crash leaves the old one or the new one). Nothing of it is ever
sent: the only personalization figures that leave a phone are a
personalization evaluation's summed counts (device_runtime.task).

`PersonalModel.suggest` serves the keyboard from the personal weights
through the plan's `next_probs` signature, mixed with the cache.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contract.metrics import suggestions
from contract.personal import PersonalCache, PersonalSpec, Personalized, mix, personalize
from contract.weights import load_checkpoint, save_checkpoint
from tflite_export.reader import TrainingPlan, load_plan

WEIGHTS, CACHE, META = "weights.safetensors", "cache.json", "meta.json"


class PersonalModel:
    """Suggestions from personal weights (a plan interpreter of its own) and the user's cache."""

    def __init__(self, plan: TrainingPlan, flat: np.ndarray, cache: PersonalCache | None, spec: PersonalSpec,
                 base_version: int, k: int = 3):
        self.plan, self.cache, self.spec = plan, cache, spec
        self.base_version, self.k = base_version, k
        self.vocab = plan.vocab
        plan.set_weights(flat)

    def probabilities(self, token_ids: Sequence[int]) -> np.ndarray:
        """The personal next-word distribution [V] after `token_ids` (starting with <bos>)."""
        return mix(self.plan.next_probs(token_ids), int(token_ids[-1]), self.cache, self.spec)

    def suggest(self, token_ids: Sequence[int]) -> list[tuple[int, float]]:
        """The k best (id, probability), never pad/bos/oov, as AppModel.suggest answers."""
        p = self.probabilities(token_ids)
        return [(int(i), float(p[i])) for i in suggestions(p, self.k)]


class Personalizer:
    """A phone's personal model on disk: made, replaced and loaded here."""

    def __init__(self, data_dir: str | Path, num_threads: int | None = 1):
        self.dir = Path(data_dir) / "personal"
        self.num_threads = num_threads

    def meta(self) -> dict | None:
        """What the stored personal model was made from (None: none is stored)."""
        try:
            return json.loads((self.dir / META).read_text())
        except (OSError, ValueError):
            return None

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
        meta = {"base_version": int(version), "fell_back": result.fell_back, "spec": spec.to_json(),
                "plan": f"plan/{Path(plan_manifest).name}", "seconds": time.monotonic() - t0,
                "windows": int(len(windows)),
                "validation": {"global_top1": g.top1, "personal_top1": p.top1, "positions": g.positions}}
        scratch = self.dir.with_name("personal.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        if not result.fell_back:     # its own copy of the plan: the runtime keeps only the current one
            shutil.copytree(Path(plan_manifest).parent, scratch / "plan")
            save_checkpoint(scratch / WEIGHTS, plan.layout, result.flat, {"base_version": int(version)})
            (scratch / CACHE).write_text(json.dumps(result.cache.to_json() if result.cache else None))
        (scratch / META).write_text(json.dumps(meta))
        old = self.dir.with_name("personal.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        scratch.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)
        return result

    def load(self, k: int = 3) -> PersonalModel | None:
        """The stored personal model (None: none, a fallback, or files that do not load)."""
        meta = self.meta()
        if meta is None or meta.get("fell_back"):
            return None
        try:
            plan = load_plan(self.dir / meta["plan"], num_threads=self.num_threads)
            _, flat, _ = load_checkpoint(self.dir / WEIGHTS)
            cache_json = json.loads((self.dir / CACHE).read_text())
            cache = PersonalCache.from_json(cache_json) if cache_json else None
            return PersonalModel(plan, flat, cache, PersonalSpec.from_json(meta["spec"]), meta["base_version"], k)
        except (OSError, ValueError, KeyError):
            return None
