"""Personalization: what a phone's personal model is, how it is judged, and what leaves the phone. TF-free.

A personal model is the global model fine-tuned on the phone's own text
(`PersonalSpec.epochs` at `lr`, through the training plan's `personalize`
signature, which moves only the layers the plan was exported to personalize)
and a *personal cache* (contract.tasks.personal_cache, re-exported here):
unigram and bigram counts of the words its user typed, mixed into the
model's next-word distribution. It never leaves the phone. The device and
the simulation both use this module, so their evaluations agree exactly.

Judging it: the phone's text, in the order it was typed, is split at
`adapt_fraction` (the first part adapts, the rest scores — Wang et al.
2019). Within the adapt part, the last `validation_fraction` is held back:
the model adapted on the rest is compared with the global model there, and
if it loses top-1 hits there, or more than `fallback_nats` of log-likelihood,
the phone falls back to the global model (`decide`).

What a federated personalization evaluation reports (`PersonalReport`) is a
vector of counts: hits of both models, positions, and one-hot buckets of
the phone's top-1 before and after, so that a sum over devices gives the
server a histogram, never one device's figure.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from contract.protocol import schema as sc
from contract.model.batching import client_batches
from contract.model.metrics import Hits
# the cache lives in personal_cache; these names stay importable from here (the public API)
from contract.tasks.personal_cache import PersonalCache, mix, softmax, window_scores  # noqa: F401

BUCKETS = 20                   # top-1 histogram: [0, 0.05), [0.05, 0.10), ..., [0.95, 1.0]


@dataclasses.dataclass(frozen=True)
class PersonalSpec:
    """How a phone personalizes (the population's `[populations.<p>.personalization]`)."""

    epochs: int = 1                # fine-tuning passes over the adapt windows (0: the cache only)
    lr: float = 0.05               # fine-tuning SGD learning rate (small: the global model is a good start)
    cache_weight: float = 0.1      # λ: the cache's share of the mixture (0: no cache)
    cache_smoothing: float = 1.0   # κ: how fast a previous word's bigrams take over from the unigrams
    fallback_nats: float = 2.0     # held back: the log-likelihood the personal model may lose (with no top-1 loss)
    adapt_fraction: float = 0.8    # evaluation: the first 80% of the windows adapt, the last 20% score
    validation_fraction: float = 0.2   # of the adapt part, held back to decide whether to fall back
    max_windows: int = 512         # the most recent windows a phone adapts on (bounds the work)

    def validate(self) -> "PersonalSpec":
        checks = [(self.epochs >= 0, "epochs must be >= 0"), (self.lr >= 0, "lr must be >= 0"),
                  (0 <= self.cache_weight < 1, "cache_weight must be in [0, 1)"),
                  (self.cache_smoothing > 0, "cache_smoothing must be > 0"),
                  (self.fallback_nats >= 0, "fallback_nats must be >= 0"),
                  (0 < self.adapt_fraction < 1, "adapt_fraction must be in (0, 1)"),
                  (0 < self.validation_fraction < 1, "validation_fraction must be in (0, 1)"),
                  (self.max_windows >= 1, "max_windows must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"personalization: {message}")
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PersonalSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"personalization: unknown keys {sorted(unknown)}")
        kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
        values = {}
        for k, v in data.items():
            if kinds[k] is int and float(v) != int(v):
                raise ValueError(f"personalization: {k} must be an integer")
            values[k] = kinds[k](v)
        return cls(**values).validate()


def split(windows: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first `fraction` of the windows (in typing order) and the rest; both non-empty when
    there are at least two windows."""
    n = len(windows)
    cut = min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 else n
    return windows[:cut], windows[cut:]


def decide(base: tuple[Hits, float], personal: tuple[Hits, float], spec: PersonalSpec) -> bool:
    """Keep the personal model only if, on the held-back text, it suggests the typed word at least as
    often as the global model and its log-likelihood is at most `fallback_nats` below the global one's
    (top-1 alone ties on most phones' few held-back words; the likelihood breaks those ties)."""
    return personal[0].top1 >= base[0].top1 and personal[1] >= base[1] - spec.fallback_nats


class PersonalPlan(Protocol):
    """What personalization needs of a training plan (tflite_export.reader.TrainingPlan on LiteRT)."""

    batch_size: int

    def set_weights(self, flat: np.ndarray) -> None: ...

    def get_weights(self) -> np.ndarray: ...

    def personalize_windows(self, windows: np.ndarray, lr: float): ...

    def infer(self, x: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass
class Personalized:
    """A phone's personal model, or the decision to stay with the global one."""

    flat: np.ndarray | None          # fine-tuned weights (None: fell back to the global model)
    cache: PersonalCache | None
    fell_back: bool
    validation: tuple[Hits, Hits]    # the global and the personal model on the held-back windows


def adapt(plan: PersonalPlan, global_flat: np.ndarray, windows: np.ndarray, spec: PersonalSpec,
          seed: int = 0) -> tuple[np.ndarray, PersonalCache | None]:
    """Fine-tune the global weights on `windows` (spec.epochs through the plan's `personalize`) and
    count the cache; the plan is left holding the fine-tuned weights."""
    plan.set_weights(global_flat)
    if spec.epochs and spec.lr and len(windows):
        for batch in client_batches(windows, plan.batch_size, spec.epochs, seed):
            plan.personalize_windows(batch, spec.lr)
        flat = plan.get_weights()
    else:
        flat = np.asarray(global_flat, np.float32)
    return flat, (PersonalCache.from_windows(windows) if spec.cache_weight else None)


def score(plan: PersonalPlan, flat: np.ndarray, cache: PersonalCache | None, windows: np.ndarray,
          spec: PersonalSpec) -> tuple[Hits, float]:
    """Hits and log-likelihood of weights `flat` (mixed with `cache`) on `windows`, computed by the plan."""
    if not len(windows):
        return Hits(), 0.0
    plan.set_weights(flat)
    return window_scores(plan.infer(np.asarray(windows)[:, :-1]), windows, cache, spec)


def personalize(plan: PersonalPlan, global_flat: np.ndarray, windows: np.ndarray, spec: PersonalSpec,
                seed: int = 0) -> Personalized:
    """The personal model of a phone whose text is `windows` (in typing order), or a fallback.

    The most recent `max_windows` count. The last `validation_fraction` of
    them is held back: a model adapted on the rest must do at least as well
    there as the global model, or the phone keeps the global one (with too
    little text to tell, it does too). A model that passes is adapted again
    on all the windows, and that is the one kept.
    """
    windows = np.asarray(windows)[-spec.max_windows:]
    fit, held = split(windows, 1 - spec.validation_fraction)
    flat, cache = adapt(plan, global_flat, fit, spec, seed)
    personal = score(plan, flat, cache, held, spec)
    base = score(plan, global_flat, None, held, spec)
    if not base[0].positions or not decide(base, personal, spec):
        plan.set_weights(global_flat)
        return Personalized(None, None, True, (base[0], personal[0]))
    flat, cache = adapt(plan, global_flat, windows, spec, seed)
    return Personalized(flat, cache, False, (base[0], personal[0]))


def evaluate(plan: PersonalPlan, global_flat: np.ndarray, windows: np.ndarray, spec: PersonalSpec,
             seed: int = 0) -> PersonalReport:
    """A federated personalization evaluation on one phone: personalize on the first
    `adapt_fraction` of its windows, score the global model and what the phone would use (its
    personal model, or the global one after a fallback) on the rest."""
    adapt_part, scored = split(np.asarray(windows), spec.adapt_fraction)
    chosen = personalize(plan, global_flat, adapt_part, spec, seed)
    base = score(plan, global_flat, None, scored, spec)[0]
    mine = base if chosen.fell_back else score(plan, chosen.flat, chosen.cache, scored, spec)[0]
    plan.set_weights(global_flat)
    return PersonalReport(base, mine, chosen.fell_back)


def bucket(top1: float) -> int:
    """The histogram bucket of a top-1 accuracy in [0, 1]."""
    return min(int(np.floor(float(top1) * BUCKETS)), BUCKETS - 1)


@dataclasses.dataclass
class PersonalReport:
    """One device's personalization evaluation, as the vector it uploads (and a server sums)."""

    global_hits: Hits
    personal_hits: Hits
    fell_back: bool

    @staticmethod
    def size() -> int:
        return 6 + 2 * BUCKETS + 3

    def vector(self) -> np.ndarray:
        """[g top1, g top3, p top1, p top3, positions, devices, g histogram, p histogram,
        helped, hurt, fell back] as int64: everything a sum over devices needs."""
        g, p = self.global_hits, self.personal_hits
        out = np.zeros(self.size(), np.int64)
        out[:6] = [g.top1, g.top3, p.top1, p.top3, g.positions, 1]
        n = max(g.positions, 1)
        out[6 + bucket(g.top1 / n)] = 1
        out[6 + BUCKETS + bucket(p.top1 / n)] = 1
        out[6 + 2 * BUCKETS:] = [p.top1 > g.top1, p.top1 < g.top1, self.fell_back]
        return out


def check_counts(counts: np.ndarray | list[int], devices: int = 1) -> np.ndarray:
    """A report (or a sum of `devices` reports) as int64, or ValueError naming what is inconsistent:
    what a server must refuse before adding one device's report to a sum."""
    v = np.asarray(counts, dtype=object)
    if v.shape != (PersonalReport.size(),) or not all(isinstance(x, (int, np.integer)) and not isinstance(
            x, bool) and 0 <= x < 2**53 for x in v):
        raise ValueError(f"counts must be {PersonalReport.size()} integers >= 0")
    v = v.astype(np.int64)
    g1, g3, p1, p3, positions, n = v[:6]
    hist = (v[6:6 + BUCKETS].sum(), v[6 + BUCKETS:6 + 2 * BUCKETS].sum())
    if not (g1 <= g3 <= positions and p1 <= p3 <= positions and n == devices and hist == (n, n)
            and max(v[6 + 2 * BUCKETS:]) <= n and v[-3] + v[-2] <= n):
        raise ValueError("inconsistent counts: need top1 <= top3 <= positions for both models, devices = "
                         f"{devices}, one bucket per device in each histogram, helped + hurt <= devices")
    return v


@dataclasses.dataclass(frozen=True)
class PersonalEvalReport:
    """The body a personalize task posts (`/v1/sessions/<id>/personal`): one PersonalReport vector.

    `masked`: under secure aggregation the vector is the device's counts plus its SecAgg+ masks,
    modulo 2^32 (contract.secagg.masking.DeviceSecAgg.mask), so the server can check only the round's
    unmasked sum (check_counts with `devices` = the survivors), never one device's report."""

    model_version: int
    counts: tuple[int, ...]
    masked: bool = False

    SCHEMA = sc.Obj("PersonalEvalReport", [
        sc.Field("model_version", sc.Int(0)),
        sc.Field("counts", sc.Arr(sc.Int(0, 2**53 - 1), PersonalReport.size(), min_items=PersonalReport.size(),
                                  description=f"exactly {PersonalReport.size()} integers, "
                                              "contract.tasks.personal.PersonalReport.vector()")),
        sc.Field("masked", sc.Bool(), required=False, default=False),
    ], description=f"counts = [global top1, global top3, personal top1, personal top3, positions, devices, "
                   f"{BUCKETS} one-hot buckets of the global model's top-1 rate, {BUCKETS} of the personal "
                   "model's, helped, hurt, fell back]. Unmasked (one device's own counts) they must be "
                   "consistent: top1 <= top3 <= positions for both models, devices = 1, exactly one 1 (the "
                   "rest 0) in each histogram, helped, hurt and fell back each 0 or 1 with helped + hurt <= 1; "
                   "else 400 invalid_field. masked (secure aggregation): each is a uint32 word (< 2^32), the "
                   "counts plus the device's masks; only the round's unmasked sum is checked")

    @classmethod
    def from_json(cls, value) -> "PersonalEvalReport":
        from contract.protocol.errors import ErrorCode, ProtocolError
        from contract.secagg.masking import WORD_MODULUS

        parsed = cls.SCHEMA.parse(value)
        counts, masked = parsed["counts"], parsed["masked"]
        try:
            if masked:
                if len(counts) != PersonalReport.size() or max(counts, default=0) >= WORD_MODULUS:
                    raise ValueError(f"a masked report is {PersonalReport.size()} words < 2^32")
            else:
                counts = check_counts(counts)
        except ValueError as e:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"counts: {e}") from None
        return cls(parsed["model_version"], tuple(int(c) for c in counts), masked)

    def to_json(self) -> dict:
        out = {"model_version": self.model_version, "counts": list(self.counts)}
        if self.masked:
            out["masked"] = True
        return out


def summarize(total: np.ndarray) -> dict:
    """What a summed PersonalReport vector says: both models' micro top-1/top-3, the two histograms,
    and the fractions of devices personalization helped, hurt and sent back to the global model."""
    total = np.asarray(total, np.int64)
    if total.shape != (PersonalReport.size(),):
        raise ValueError(f"a personalization report has {PersonalReport.size()} counts, got {total.shape}")
    positions, devices = max(int(total[4]), 1), max(int(total[5]), 1)
    helped, hurt, fell_back = (int(v) for v in total[6 + 2 * BUCKETS:])
    return {"devices": int(total[5]), "positions": int(total[4]),
            "global": {"top1": total[0] / positions, "top3": total[1] / positions},
            "personal": {"top1": total[2] / positions, "top3": total[3] / positions},
            "histogram": {"edges": [i / BUCKETS for i in range(BUCKETS + 1)],
                          "global": total[6:6 + BUCKETS].tolist(),
                          "personal": total[6 + BUCKETS:6 + 2 * BUCKETS].tolist()},
            "helped": helped / devices, "hurt": hurt / devices, "fell_back": fell_back / devices}


def fairness(per_user_top1: list[float] | np.ndarray) -> dict:
    """The distribution of per-user top-1: mean, median, 10th percentile (the worst decile's edge)
    and the fraction of users below half the mean."""
    v = np.asarray(per_user_top1, np.float64)
    if not len(v):
        return {"users": 0, "top1": None, "median": None, "p10": None, "below_half_mean": None}
    mean = float(v.mean())
    return {"users": int(len(v)), "top1": mean, "median": float(np.median(v)),
            "p10": float(np.percentile(v, 10)), "below_half_mean": float(np.mean(v < mean / 2))}


def fairness_from_histogram(counts: list[int]) -> dict:
    """The same figures, as far as a server's summed histogram tells them (bucket midpoints)."""
    counts = np.asarray(counts, np.int64)
    mids = (np.arange(BUCKETS) + 0.5) / BUCKETS
    return fairness(np.repeat(mids, counts)) if counts.sum() else fairness([])
