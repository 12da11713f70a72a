"""User-level differential privacy: the settings, the adaptive clip, and the noise. TensorFlow-free.

What phone, server and simulation must agree on when a population trains
with DP-FedAvg (McMahan et al. 2018) and adaptive clipping (Andrew et al.
2021), in the form TFF's `DifferentiallyPrivateFactory.gaussian_adaptive`
computes it:

* each device clips its update to the round's clip C and says whether it
  was *unclipped* (norm <= C): one bit;
* the server sums the clipped updates, adds Gaussian noise of standard
  deviation z_v·C, and divides by the *expected* number of reports (a fixed
  denominator, so that one device's presence changes the mean by at most
  C / expected);
* it sums the bits minus 1/2 each, adds Gaussian noise of standard deviation
  σ_b, and moves C geometrically toward the target unclipped quantile:
  C ← C · exp(−η · (clamp(noised fraction, 0, 1) − target)).

`noise_split` divides one total noise multiplier z between the values
(z_v) and the bits (σ_b) exactly as TFF's `adaptive_clip_noise_params` does:
1/z² = 1/z_v² + 1/(2σ_b)², since the centered bit has sensitivity 1/2.

Randomness for noise comes from the operating system's CSPRNG: `SecureRandom`
draws a ChaCha20 key from `os.urandom` and turns its keystream into uniform
doubles, normal deviates (Box–Muller) and discrete Gaussians (the rejection
sampler of Canonne, Kamath and Steinke 2020 from a discrete Laplace). No
noise ever comes from `numpy.random` or a short seed.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from contract.update.stages import Context, Stage
from contract.update.spec import COUNT_SCALE

from contract.update.spec import DP_MECHANISMS as MECHANISMS  # noqa: E402,F401  (one list)


@dataclasses.dataclass(frozen=True)
class DPSpec:
    """A population's DP setting (`[populations.<name>.dp]`; `python -m models simulate --dp`)."""

    mechanism: str = "central"          # central: the server adds Gaussian noise to the sum;
                                        # distributed: each device adds its share of discrete noise (secagg)
    noise_multiplier: float = 1.0       # z: the total, for the update and the clip estimate together
    initial_clip: float = 0.1           # C of the first round (TFF's default: start small, adapt fast)
    target_quantile: float = 0.5        # the fraction of updates that should go unclipped
    clip_learning_rate: float = 0.2     # η of the geometric update (Andrew et al.'s recommendation);
                                        # 0 keeps the clip fixed (the count is still noised and counted)
    clipped_count_stddev: float | None = None   # σ_b; default 0.05 × expected reports (TFF's)
    # DP-FTRL (mechanism = "ftrl", contract.dp.ftrl, privacy.ftrl): no sampling assumption, only a bound on
    # participation the server enforces: at most `max_participations` (k) DP rounds per accounting horizon of
    # `horizon_rounds` (n), at least `min_separation_rounds` (b) DP rounds apart; the tree restarts every
    # `restart_every` DP rounds (0: the power of two that minimises the noise, privacy.ftrl.choose_restart).
    min_separation_rounds: int = 1
    max_participations: int = 1
    horizon_rounds: int = 1000
    restart_every: int = 0

    def validate(self, where: str = "dp") -> "DPSpec":
        """This spec, or ValueError naming the setting at fault."""
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"{where}.mechanism must be one of {', '.join(MECHANISMS)}")
        for name in ("noise_multiplier", "clip_learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{where}.{name} must be a finite number >= 0")
        if not (isinstance(self.initial_clip, (int, float)) and math.isfinite(self.initial_clip)
                and self.initial_clip > 0):
            raise ValueError(f"{where}.initial_clip must be a finite number > 0")
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"{where}.target_quantile must be in [0, 1]")
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev >= 0:
            raise ValueError(f"{where}.clipped_count_stddev must be >= 0")
        for name in ("min_separation_rounds", "max_participations", "horizon_rounds"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{where}.{name} must be an integer >= 1")
        if not (isinstance(self.restart_every, int) and self.restart_every >= 0):
            raise ValueError(f"{where}.restart_every must be an integer >= 0 (0: chosen for the least noise)")
        if self.mechanism == "ftrl" and self.max_participations > -(-self.horizon_rounds // self.min_separation_rounds):
            raise ValueError(f"{where}: max_participations cannot exceed what the separation allows in a horizon "
                             "(⌈horizon_rounds / min_separation_rounds⌉)")
        return self

    def split(self, expected_reports: float) -> tuple[float, float]:
        """(z_v, σ_b) for rounds that expect `expected_reports` reports (see `noise_split`)."""
        return noise_split(self.noise_multiplier, expected_reports, self.clipped_count_stddev)


def noise_split(noise_multiplier: float, expected_reports: float,
                clipped_count_stddev: float | None = None) -> tuple[float, float]:
    """(value noise multiplier z_v, clipped-count stddev σ_b) for a total noise multiplier z.

    The same arithmetic as TFF's `adaptive_clip_noise_params`, so a server round
    and a TFF simulation of the same setting add the same noise. ValueError
    when σ_b is too small for z (z >= 2σ_b leaves nothing for the values).
    """
    if noise_multiplier <= 0:
        return 0.0, 0.0 if clipped_count_stddev is None else float(clipped_count_stddev)
    sb = 0.05 * expected_reports if clipped_count_stddev is None else float(clipped_count_stddev)
    if noise_multiplier >= 2 * sb:
        raise ValueError(f"clipped_count_stddev {sb:g} is too small for noise_multiplier "
                         f"{noise_multiplier:g}: raise it, or expect more reports per round")
    return (noise_multiplier ** -2 - (2 * sb) ** -2) ** -0.5, sb


def next_clip(clip: float, unclipped_sum: float, expected_reports: float, spec: DPSpec) -> float:
    """The next round's clip from this round's (noised) Σ(bit − 1/2) over its reports.

    `unclipped_sum` is Σ(unclipped_i − 1/2) plus N(0, σ_b²): the estimate of the
    unclipped fraction is that over the expected reports, plus 1/2, clamped to
    [0, 1] (tensorflow_privacy's QuantileEstimatorQuery, geometric update).
    """
    fraction = min(1.0, max(0.0, unclipped_sum / expected_reports + 0.5))
    return clip * math.exp(-spec.clip_learning_rate * (fraction - spec.target_quantile))


def adapt_clip(clip: float, unclipped: float, reports: int, expected_reports: float, spec: DPSpec,
               random: "SecureRandom | None" = None, noised: bool = False) -> float:
    """The next round's clip after a round whose `reports` updates held `unclipped` unclipped ones.

    Adds N(0, σ_b²) to Σ(bit − 1/2) (the clip estimate's share of the noise), then `next_clip`;
    `noised`: the devices already added it (distributed DP). The server calls this when a DP
    round closes; TFF's aggregator does the same in simulation (tests/test_dp_parity.py).
    """
    _, sb = spec.split(expected_reports)
    centered = unclipped - 0.5 * reports
    if sb > 0 and not noised:
        centered += float((random or SecureRandom()).normal(1, sb)[0])
    return next_clip(clip, centered, expected_reports, spec)


# -- noise from the OS CSPRNG ------------------------------------------------------------------------


class SecureRandom:
    """Uniform, normal and discrete-Gaussian deviates from a ChaCha20 keystream keyed by os.urandom.

    `key` is for draws that must be reproduced: tests, and DP-FTRL's tree nodes (contract.dp.ftrl
    derives each node's key from a secret population key). Everything else never passes one.
    """

    def __init__(self, key: bytes | None = None):
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("a SecureRandom key is 32 bytes")
        self._stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()

    def uniform(self, n: int) -> np.ndarray:
        """n doubles, uniform on (0, 1): 53 random bits each, never exactly 0 or 1."""
        words = np.frombuffer(self._stream.update(bytes(8 * int(n))), np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53

    def normal(self, n: int, stddev: float = 1.0) -> np.ndarray:
        """n independent N(0, stddev²) deviates (Box–Muller)."""
        half = (int(n) + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:int(n)]
        return z * float(stddev)

    def discrete_gaussian(self, n: int, sigma: float) -> np.ndarray:
        """n independent draws of the discrete Gaussian N_Z(0, σ²) (int64).

        Canonne, Kamath and Steinke (2020), Algorithm 3, vectorized: a discrete
        Laplace of scale t = ⌊σ⌋ + 1 (the difference of two geometrics), kept
        with probability exp(−(|y| − σ²/t)² / (2σ²)); about 1.6 draws per kept one.
        """
        n = int(n)
        if sigma <= 0:
            return np.zeros(n, np.int64)
        t = math.floor(sigma) + 1
        out = np.empty(0, np.int64)
        while out.size < n:
            want = max(1024, int(1.7 * (n - out.size)))
            g = np.floor(-t * np.log(self.uniform(2 * want))).astype(np.int64)
            y = g[:want] - g[want:]
            keep = self.uniform(want) < np.exp(-(np.abs(y) - sigma ** 2 / t) ** 2 / (2 * sigma ** 2))
            out = np.concatenate([out, y[keep]])
        return out[:n]


# -- the noise as update-pipeline stages (contract.update.pipeline composes them) -----------------------


@dataclasses.dataclass(frozen=True)
class CentralNoise(Stage):
    """DP-FedAvg's Gaussian noise, added by the server to the sum of clipped updates (contract.dp.noise).

    The device sends its clipped update unchanged; the noise's standard
    deviation (z_v · C) is fixed by the round's spec, and it is drawn from the
    OS CSPRNG when the round's sum is decoded, before the fixed-denominator mean.
    """

    stddev: float

    def decode(self, total: np.ndarray, ctx: Context) -> np.ndarray:
        if self.stddev <= 0:
            return total
        rng = ctx.random if ctx.random is not None else SecureRandom()
        return total + rng.normal(len(total), self.stddev)


@dataclasses.dataclass(frozen=True)
class DistributedNoise(Stage):
    """Distributed DP: each device adds its share of discrete Gaussian noise before masking.

    Kairouz et al. (2021): every device adds N_Z(0, σ²) to each of its grid
    codes (after its norm check, so the clip still bounds the sensitivity),
    and N_Z(0, σ_c²) to COUNT_SCALE × its unclipped bit, with σ, σ_c from the
    round's spec; the unmasked sum of n devices then carries noise of
    variance nσ² that no one, the server included, saw added. Draws come from
    the OS CSPRNG (contract.dp.noise.SecureRandom).
    """

    sigma: float                # per device, in grid steps (RoundSpec.device_noise_units)
    count_sigma: float          # per device, in 1/COUNT_SCALE units of the count

    def encode(self, q: np.ndarray, ctx: Context) -> np.ndarray:
        rng = ctx.random if ctx.random is not None else SecureRandom()
        ctx.count_value = int(COUNT_SCALE * ctx.unclipped + rng.discrete_gaussian(1, self.count_sigma)[0])
        return q.astype(np.int64) + rng.discrete_gaussian(len(q), self.sigma)

    def decode(self, total: np.ndarray, ctx: Context) -> np.ndarray:
        ctx.unclipped_sum = ctx.unclipped_sum / COUNT_SCALE     # a noised count: a float, maybe < 0
        return total
