"""Plausible sums: whether an unmasked secure-aggregation sum is one that honest phones could have sent.

Under secure aggregation the server never sees one update, only the sum of
the survivors' (contract.secagg.masking), so it cannot refuse a single
update off the grid, of an impossible weight or above the clip. What it can
do is refuse a *sum* that no `reports` honest phones could have produced, and
publish nothing from it. An honest phone (contract.update.pipeline) sends,
in the ring (contract.update.masked.RingEncoding):

* codes + L in 0..2L on the round's grid (step s, L = 2^(b−1) − 1), whose
  norm it has checked: ||q||·s <= min(C, C·w/W + R·sqrt(w/W))
  (contract.update.spec.RoundSpec.masked_bound: R leaves room for the grid's
  rounding, which a small update cannot avoid);
* its weight w in 1..W (W = 1 under uniform weighting), and under DP its
  "unclipped" bit (times COUNT_SCALE, noised, under distributed DP);
* under distributed DP, discrete Gaussian noise N_Z(0, σ²) on each code and
  N_Z(0, σ_b²) on the bit (contract.dp.noise.DistributedNoise).

So the sum of n honest phones has Σw in [n, nW]; every coordinate of Σq
within nL (+ the noise's tail); ||Σq||·s <= min(nC, C·Σw/W + R·sqrt(n·Σw/W))
(Cauchy–Schwarz on Σ sqrt(w_i/W); + the noise's); and the count in
[0, n·COUNT_SCALE] (+ its tail). Without DP the bounds are exact: an honest
round is never refused. With distributed DP the
noise is a sum of n independent σ²-subgaussian draws per coordinate (the
discrete Gaussian is σ²-subgaussian: Canonne, Kamath and Steinke 2020), so
a coordinate exceeds τ = σ·sqrt(2n·ln(2d/δ)) with probability < δ over all
d of them (a union bound), the noise vector's norm exceeds
σ·sqrt(n)·sqrt(d + 2·sqrt(d·t) + 2t) with probability < e^−t (Hsu, Kakade
and Zhang 2012), and the count exceeds its τ likewise: with δ =
FALSE_REFUSAL / 3 each, an honest noised round is refused with probability
below FALSE_REFUSAL = 1e-9.

What one modified phone can still do after these checks (`largest_step`):
under uniform weighting, move the mean by at most C (plus the noise
allowance): what `reports` honest phones at the clip pointing the same way
would, about sqrt(reports) times an honest round's step. Under example
weighting it may also lower Σw to `reports`, and the bound on the mean
grows to min(W·C, C + R·sqrt(W)).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from contract.update.packing import levels
from contract.update.spec import COUNT_SCALE, RoundSpec
from contract.update.masked import RingEncoding
from contract.update.stages import Context

FALSE_REFUSAL = 1e-9        # an honest round under distributed DP is refused with less than this probability
REASONS = ("reports", "weight_sum", "coordinate", "norm", "unclipped_count", "counts")


class ImplausibleSum(ValueError):
    """An unmasked sum no set of honest phones could have produced; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"implausible sum ({reason}): {message}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class SumBounds:
    """What the unmasked sum of `reports` honest updates of one round may hold (see the module)."""

    reports: int
    weight_sum: tuple[int, int]         # Σw, inclusive
    coordinate: float                   # max |Σ codes| of one coordinate, in grid steps
    noise_norm: float                   # the allowance for the noise's norm, in grid steps
    count: tuple[float, float]          # the unclipped count slot, centered (DP rounds; else (0, 0))
    clip: float                         # C
    weight_cap: int                     # W
    rounding: float                     # R of RoundSpec.masked_bound: room for one phone's grid rounding

    def norm(self, weight_sum: int) -> float:
        """The largest ||Σ codes||·step honest phones of total weight `weight_sum` send, noise aside."""
        n, c, share = self.reports, self.clip, weight_sum / self.weight_cap
        return min(n * c, c * share + self.rounding * math.sqrt(n * share))


def bounds(round_spec: RoundSpec, reports: int) -> SumBounds:
    """The bounds of the unmasked sum of `reports` honest updates of a round under secure aggregation."""
    s, n = round_spec.spec, int(reports)
    L, d = levels(s.bits), round_spec.padded
    delta = FALSE_REFUSAL / 3
    sigma, sigma_b = round_spec.device_noise_units, round_spec.device_count_noise_units
    tail = math.log(1 / delta)
    coordinate = n * L + sigma * math.sqrt(2 * n * math.log(2 * d / delta))
    noise_norm = sigma * math.sqrt(n) * math.sqrt(d + 2 * math.sqrt(d * tail) + 2 * tail)
    if round_spec.dp_mechanism == "distributed":
        slack = sigma_b * math.sqrt(2 * n * math.log(2 / delta))
        count = (-slack, n * COUNT_SCALE + slack)
    else:
        count = (0.0, float(n))
    return SumBounds(n, (n, n * s.weight_cap), coordinate, noise_norm, count, s.clip_norm, s.weight_cap,
                     round_spec.grid_rounding)


def check_update_sum(round_spec: RoundSpec, ring_sum: np.ndarray, reports: int) -> None:
    """ImplausibleSum unless `ring_sum` (the unmasked sum of `reports` masked updates, as
    contract.update.masked.RingEncoding lays it out) is one honest phones could have produced."""
    if not round_spec.spec.secure_aggregation:
        raise ValueError("only a round under secure aggregation has an unmasked sum to check")
    n = int(reports)
    if not 1 <= n <= round_spec.cohort_max:
        raise ImplausibleSum("reports", f"{n} reports, outside [1, cohort_max = {round_spec.cohort_max}]")
    ring = RingEncoding(round_spec.spec.bits, round_spec.padded, round_spec.modulus_bits,
                        bool(round_spec.dp_mechanism))
    total = np.array(ring_sum, np.int64)
    if total.shape != (ring.count + ring.tail,):
        raise ValueError(f"the unmasked sum has shape {total.shape}, the round's ring "
                         f"({ring.count + ring.tail},)")
    ctx = Context(survivors=n)
    codes = ring.decode(ring.reduce(total), ctx)
    b = bounds(round_spec, n)
    low, high = b.weight_sum
    if not low <= ctx.weight_sum <= high:
        raise ImplausibleSum("weight_sum", f"Σw = {ctx.weight_sum} (mod 2^32) is outside [{low}, {high}] "
                                           f"for {n} reports of weight 1..{b.weight_cap}")
    peak = int(np.abs(codes).max(initial=0))
    if peak > b.coordinate:
        raise ImplausibleSum("coordinate", f"a coordinate of the codes' sum is {peak} grid steps from 0; "
                                           f"{n} reports reach at most {b.coordinate:.6g}")
    step = round_spec.grid_step
    norm = float(np.linalg.norm(codes.astype(np.float64))) * step
    limit = b.norm(ctx.weight_sum) + b.noise_norm * step
    if not norm <= limit * (1 + 1e-9):
        raise ImplausibleSum("norm", f"the codes' sum has L2 norm {norm:.6g}; {n} clipped reports of total "
                                     f"weight {ctx.weight_sum} reach at most {limit:.6g}")
    if ring.indicator and not b.count[0] <= ctx.unclipped_sum <= b.count[1]:
        raise ImplausibleSum("unclipped_count", f"the unclipped count {ctx.unclipped_sum} is outside "
                                                f"[{b.count[0]:.6g}, {b.count[1]:.6g}]")


def check_count_sum(counts, reports: int) -> np.ndarray:
    """A personalize round's unmasked sum of `reports` count vectors (contract.tasks.personal), as
    int64, or ImplausibleSum naming what no `reports` honest phones could have summed to."""
    from contract.tasks.personal import check_counts

    try:
        return check_counts([int(x) for x in np.asarray(counts, np.int64)], int(reports))
    except ValueError as e:
        raise ImplausibleSum("counts", str(e)) from None


@dataclasses.dataclass(frozen=True)
class StepBound:
    """The L2 norm of a round's mean update: the largest the checks let one modified phone cause,
    and an honest round's typical one."""

    largest: float
    honest: float

    @property
    def ratio(self) -> float:
        return self.largest / self.honest if self.honest > 0 else math.inf


def largest_step(round_spec: RoundSpec, reports: int, honest_step: float | None = None) -> StepBound:
    """The largest norm of the mean update a round of `reports` reports can take when one of them
    comes from a modified phone and every check passes, against an honest round's typical step.

    The honest step, unless measured and given, is that of `reports` independent updates at the
    clip, equally weighted, plus the round's DP noise: sqrt(n·C² + ||noise||²) / denominator
    (updates that agree make it larger, and the ratio smaller). In a plain round the modified
    update is at most C (its weight's share) and is counted once: it adds at most C / n along the
    honest sum. Under secure aggregation it is unseen, and takes whatever the sum's checks leave
    (`check_update_sum`): under uniform weighting the mean may reach (n·C + the noise's
    allowance) / denominator; under example weighting Σw may be lowered to n, and the mean reach
    min(W·C, C + R·sqrt(W)) (R: RoundSpec.masked_bound's room for rounding).
    """
    s, n = round_spec.spec, int(reports)
    if n < 1:
        raise ValueError("a round has at least one report")
    C, W = s.clip_norm, s.weight_cap
    den = round_spec.dp_denominator or n
    noise = 0.0
    if round_spec.dp_mechanism in ("central", "ftrl"):        # the server's noise (ftrl: one node's, roughly)
        noise = round_spec.dp_stddev * math.sqrt(round_spec.size)
    elif round_spec.dp_mechanism == "distributed":
        noise = round_spec.dp_stddev * math.sqrt(round_spec.size * n / round_spec.dp_denominator)
    honest = math.sqrt(n * C * C + noise * noise) / den if honest_step is None else float(honest_step)
    if not s.secure_aggregation:
        largest = math.hypot(C * math.sqrt(n - 1) + C, noise) / den
    elif W == 1:
        b = bounds(round_spec, n)
        largest = (b.norm(n) + b.noise_norm * round_spec.grid_step) / den
    else:
        largest = min(W * C, C + bounds(round_spec, n).rounding * math.sqrt(W))
    return StepBound(largest, honest)
