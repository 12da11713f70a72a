"""(ε, δ) of DP-FTRL with tree aggregation under server-enforced (k, b)-participation. TensorFlow-free.

No sampling assumption: the guarantee rests only on what the server enforces
for each device within an accounting horizon of n DP rounds — at most k
participations, any two at least b rounds apart (Kairouz et al. 2021;
Choquette-Choo et al. 2023). One horizon of the mechanism of contract.dp.ftrl
releases, on the sums divided by their clip,

* the tree's nodes, C·x + N(0, z²I), C the 0/1 node × round matrix of trees
  restarted every `restart_every` rounds (`tree_strategy`), whose worst-case
  shift over a device's patterns is Δ = `privacy.sensitivity.sensitivity(C, k, b)`;
* the adaptive clip's count, Σ(unclipped − 1/2) + N(0, σ_b²) each round,
  sensitivity 1/2 in each of the device's ≤ k rounds.

Together that is one Gaussian mechanism whose worst mean shift over the noise
is μ with μ² = Δ²/z² + k/(4σ_b²): ρ-zCDP with ρ = μ²/2. Inputs chosen
adaptively (each round's model and clip depend on earlier releases) do not
change that, as every node is released only once all its rounds are in
(Denisov et al. 2022, Thm 2.1), and Gaussian mechanisms compose exactly by
adding μ² (Dong, Roth & Su 2019), so horizons add their ρ. (ε, δ) is that of
the Gaussian mechanism with noise multiplier 1/μ, from `dp_accounting` (PLD,
tight; RDP beside it, as privacy.accounting reports both).

Neighbouring histories differ in one device's *data*: its contributions are
replaced by zero (the clipped update, and its centered unclipped bit ±1/2),
as in Kairouz et al. and Gboard's DP-FTRL. That a device took part, and how
many reports a round had, are not what this ε protects; what it needs is that
the k and b the server enforces are counted in DP round indices, the same
indices contract.dp.ftrl places in the trees, horizon by horizon
([h·n, (h + 1)·n)).

`project` gives what a deployment needs: with N devices and m reports per
round a device can be spread at most b = ⌊N/m⌋ rounds apart, so over n
rounds it takes part k = ⌈n/b⌉ times; the noise multiplier for a target ε
follows.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from dp_accounting import GaussianDpEvent, pld, rdp
from scipy import sparse

from contract.dp.ftrl import node_leaves, tree_nodes
from privacy.accounting import PLD_INTERVAL, PLD_MIN_Z, RDP_ORDERS
from privacy.sensitivity import check_participation, max_participations, sensitivity

MECHANISM = "ftrl"
ASSUMPTION = "participation"        # what the ε rests on (DP-FedAvg's: "poisson")


def tree_strategy(rounds: int, restart_every: int) -> sparse.csr_matrix:
    """The strategy of one horizon's first `rounds` rounds: for every tree (restarted every
    `restart_every` rounds) its complete dyadic nodes as 0/1 rows over the rounds they sum.

    Nodes of the current tree that are not complete yet have been released by
    no round so far; they are left out, which is what makes a partial
    horizon's ε smaller than the full one's.
    """
    rows, cols, count = [], [], 0
    for start in range(0, rounds, restart_every):
        for node in tree_nodes(min(restart_every, rounds - start)):
            leaves = node_leaves(node)
            cols.extend(start + j for j in leaves)
            rows.extend([count] * len(leaves))
            count += 1
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(count, rounds))


@functools.lru_cache(maxsize=256)
def tree_sensitivity(rounds: int, restart_every: int, k: int, b: int) -> float:
    """Δ of `tree_strategy(rounds, restart_every)` under (k, b)-participation (cached: the ledger asks
    for the same horizon every round)."""
    return sensitivity(tree_strategy(rounds, restart_every), k, b) if rounds > 0 else 0.0


def horizon_rho(noise_multiplier: float, count_stddev: float | None, rounds: int, restart_every: int,
                k: int, b: int) -> tuple[float, float]:
    """(ρ, Δ) of one horizon's first `rounds` rounds.

    `noise_multiplier`: z, each node's noise stddev over the round's clip;
    `count_stddev`: σ_b of the unclipped count (None: no count released, a fixed clip).
    """
    check_participation(k, b)
    values_sensitivity = tree_sensitivity(rounds, restart_every, k, b)
    rho = _gaussian_rho(values_sensitivity, noise_multiplier)
    if count_stddev is not None:
        rho += _gaussian_rho(0.5 * math.sqrt(max_participations(rounds, k, b)), count_stddev)
    return rho, values_sensitivity


def _gaussian_rho(shift: float, stddev: float) -> float:
    if shift == 0:
        return 0.0
    return math.inf if stddev <= 0 else shift ** 2 / (2 * stddev ** 2)


@dataclasses.dataclass(frozen=True)
class FtrlSpent:
    """What the ledger records for a population's DP-FTRL rounds so far."""

    epsilon: float
    delta: float
    rho: float                  # zCDP of everything released so far (values and clip counts)
    sensitivity: float          # Δ of one full horizon's tree (values only)
    accountant: str             # "pld" | "rdp": which gave `epsilon` (the tighter)
    rounds: int
    by_accountant: dict
    mechanism: str = MECHANISM
    assumption: str = ASSUMPTION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def ftrl_spent(noise_multiplier: float, count_stddev: float | None, rounds_so_far: int, horizon: int,
               k: int, b: int, delta: float, restart_every: int) -> FtrlSpent:
    """(ε, δ), ρ and Δ after `rounds_so_far` DP-FTRL rounds: complete horizons and the current one compose."""
    if horizon < 1 or restart_every < 1 or rounds_so_far < 0:
        raise ValueError("horizon and restart_every must be >= 1, rounds_so_far >= 0")
    done, partial = divmod(int(rounds_so_far), int(horizon))
    rho = 0.0
    if done:
        rho += done * horizon_rho(noise_multiplier, count_stddev, horizon, restart_every, k, b)[0]
    if partial:
        rho += horizon_rho(noise_multiplier, count_stddev, partial, restart_every, k, b)[0]
    epsilon, accountant, figures = epsilon_from_rho(rho, delta)
    return FtrlSpent(epsilon, delta, rho, tree_sensitivity(horizon, restart_every, k, b), accountant,
                     int(rounds_so_far), figures)


def epsilon_from_rho(rho: float, delta: float) -> tuple[float, str, dict]:
    """(ε, accountant, both figures) at `delta` of a Gaussian mechanism of ρ-zCDP (μ = √(2ρ)).

    Exactly a Gaussian: dp_accounting's GaussianDpEvent with noise multiplier 1/μ.
    PLD is skipped below PLD_MIN_Z (privacy.accounting: its support grows as 1/z).
    """
    if rho <= 0:
        return 0.0, "none", {}
    if math.isinf(rho):
        return math.inf, "none", {"pld": math.inf, "rdp": math.inf}
    event = GaussianDpEvent(1 / math.sqrt(2 * rho))
    figures = {"rdp": float(rdp.RdpAccountant(RDP_ORDERS).compose(event).get_epsilon(delta))}
    if event.noise_multiplier >= PLD_MIN_Z:
        accountant = pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL)
        figures["pld"] = float(accountant.compose(event).get_epsilon(delta))
    best = min(figures, key=figures.get)
    return figures[best], best, figures


def rho_for_epsilon(epsilon: float, delta: float, tolerance: float = 1e-5) -> float:
    """The largest ρ (to `tolerance`, relative) whose `epsilon_from_rho` is <= `epsilon`.

    Bisection on log ρ, bracketed from below by the standard conversion
    ε = ρ + 2√(ρ·log(1/δ)) (Bun & Steinke 2016), which the exact Gaussian never exceeds.
    """
    log_inv = math.log(1 / delta)
    lo = (math.sqrt(log_inv + epsilon) - math.sqrt(log_inv)) ** 2
    while epsilon_from_rho(lo, delta)[0] > epsilon:
        lo /= 2
    hi = 2 * lo
    while epsilon_from_rho(hi, delta)[0] <= epsilon:
        lo, hi = hi, 2 * hi
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if epsilon_from_rho(mid, delta)[0] <= epsilon else (lo, mid)
    return lo


# -- the deployment projection -------------------------------------------------------------------------


def prefix_nodes_mean(rounds: int, restart_every: int) -> float:
    """The model's accumulated tree noise (server SGD on the releases, a constant clip), in node
    variances, averaged over a horizon's rounds: every finished tree leaves popcount(its leaves) nodes,
    the current one popcount(leaves so far). The utility side of choosing `restart_every`."""
    t = np.arange(1, rounds + 1)
    finished, leaves = (t - 1) // restart_every, (t - 1) % restart_every + 1
    popcount = np.vectorize(lambda x: bin(int(x)).count("1"))
    return float(np.mean(finished * bin(restart_every).count("1") + popcount(leaves)))


def choose_restart(rounds: int, k: int, b: int) -> int:
    """The power of two (a full tree's total noise is then one node) that minimizes Δ² × the model's
    mean accumulated noise, i.e. the model noise at a fixed ρ; from about b/2 to the whole horizon."""
    first = max(0, b.bit_length() - 2)
    candidates = [1 << p for p in range(first, max(first, (rounds - 1).bit_length()) + 1)]
    return min(candidates, key=lambda r: tree_sensitivity(rounds, r, k, b) ** 2 * prefix_nodes_mean(rounds, r))


@dataclasses.dataclass(frozen=True)
class Projection:
    """The noise a deployment needs for a target ε over one horizon, and what it means per round."""

    devices: int                # N
    reports_per_round: int      # m
    rounds: int                 # n, the horizon
    separation: int             # b = ⌊N/m⌋
    participations: int         # k = ⌈n/b⌉
    restart_every: int
    target_epsilon: float
    delta: float
    noise_multiplier: float     # z: each node's noise stddev over the clip
    count_stddev: float         # σ_b
    sensitivity: float          # Δ
    rho: float
    epsilon: float              # what ftrl_spent gives for z (<= target)
    node_noise_on_mean: float   # z / m: one node's noise on the mean update, in clips
    model_noise_on_mean: float  # z·√(prefix_nodes_mean) / m: the model's accumulated noise, in clips

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def project(devices: int, reports_per_round: int, rounds: int, target_epsilon: float, delta: float,
            restart_every: int | None = None, count_stddev: float | None = None) -> Projection:
    """The DP-FTRL noise for N devices, m reports per round and n rounds at (target ε, δ).

    σ_b defaults to m/20 (TFF's clipped_count_stddev). ValueError if the
    clip count alone spends the target.
    """
    b = devices // reports_per_round
    if b < 1:
        raise ValueError("fewer devices than reports per round: no device can be spread out")
    k = max_participations(rounds, rounds, b)
    restart = restart_every or choose_restart(rounds, k, b)
    sb = reports_per_round / 20 if count_stddev is None else float(count_stddev)
    rho = rho_for_epsilon(target_epsilon, delta)
    count_rho = _gaussian_rho(0.5 * math.sqrt(k), sb)
    if count_rho >= rho:
        raise ValueError(f"the clip count alone (σ_b = {sb:g}) spends more than ε = {target_epsilon:g}")
    values_sensitivity = tree_sensitivity(rounds, restart, k, b)
    z = values_sensitivity / math.sqrt(2 * (rho - count_rho)) * (1 + 1e-9)
    spent = ftrl_spent(z, sb, rounds, rounds, k, b, delta, restart)
    return Projection(devices, reports_per_round, rounds, b, k, restart, target_epsilon, delta, z, sb,
                      values_sensitivity, spent.rho, spent.epsilon, z / reports_per_round,
                      z * math.sqrt(prefix_nodes_mean(rounds, restart)) / reports_per_round)
