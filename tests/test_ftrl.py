"""DP-FTRL: the tree noise (contract.dp.ftrl) and its accounting (privacy.ftrl, privacy.sensitivity).

* the sensitivity equals a brute-force maximum over every (k, b)-pattern on
  horizons of <= 16 rounds (trees with restarts, random laminar and banded
  strategies), and tensorflow_privacy's tree accountant on a larger tree;
* ρ and ε equal hand-computed figures (the exact Gaussian δ(ε) curve);
* the noise is exactly B·g for the decoder B the strategy implies (B·C = I),
  its covariance is z²·B·Bᵀ within 3 standard errors, and TFF's
  `tree_aggregation` (non-efficient) noise has the same covariance;
* a mechanism rebuilt from the key continues with the same noise; zero noise
  gives exactly the plain sums, as TFF's tree_aggregation does.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, sparse, stats

from contract.dp.ftrl import TreeNoise, locate, new_key, residual_nodes, starts_tree, tree_nodes
from privacy.ftrl import (choose_restart, epsilon_from_rho, ftrl_spent, horizon_rho, project,
                          tree_sensitivity, tree_strategy)
from privacy.sensitivity import brute_force_sensitivity, sensitivity

KEY = bytes(range(32))


# -- sensitivity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 8, 11, 16])
def test_tree_sensitivity_equals_brute_force_over_every_pattern(n):
    checked = 0
    for restart in sorted({1, 2, 3, 4, 5, 8, n} & set(range(1, n + 1))):
        strategy = tree_strategy(n, restart)
        for k in (1, 2, 3, 5):
            for b in range(1, n + 1):
                assert sensitivity(strategy, k, b) == pytest.approx(
                    brute_force_sensitivity(strategy, k, b), abs=1e-12), (n, restart, k, b)
                checked += 1
    assert checked >= 4 * n * 4


def random_laminar(g: np.random.Generator, n: int) -> np.ndarray:
    """Rows constant on nested-or-disjoint runs, random nonzero values (both signs)."""
    rows = []

    def split(lo: int, hi: int) -> None:
        if g.random() < 0.7:
            row = np.zeros(n)
            row[lo:hi] = g.normal() or 1.0
            rows.append(row)
        if hi - lo > 1:
            cuts = np.sort(g.choice(np.arange(lo + 1, hi), size=min(hi - lo - 1, int(g.integers(1, 3))),
                                    replace=False))
            for a, c in zip([lo, *cuts], [*cuts, hi]):
                if g.random() < 0.8:
                    split(int(a), int(c))
    split(0, n)
    return np.array(rows) if rows else np.zeros((1, n))


def test_laminar_and_banded_strategies_equal_brute_force():
    g = np.random.default_rng(7)                                    # test data, not noise
    for _ in range(30):
        n = int(g.integers(2, 13))
        laminar = random_laminar(g, n)
        for k in (1, 2, 4):
            for b in range(1, n + 1):
                assert sensitivity(laminar, k, b) == pytest.approx(brute_force_sensitivity(laminar, k, b),
                                                                   rel=1e-12, abs=1e-12)
                values = g.normal(size=(n, n))
                band = np.tril(values) - np.tril(values, -b)         # b bands below the diagonal: b-banded Gram
                assert sensitivity(band, k, b) == pytest.approx(brute_force_sensitivity(band, k, b),
                                                                rel=1e-12)


def test_a_strategy_neither_laminar_nor_banded_is_refused():
    crossing = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1.0]])   # runs [0, 3) and [2, 6) cross
    with pytest.raises(ValueError, match="neither laminar"):
        sensitivity(crossing, 2, 2)
    assert sensitivity(crossing, 2, 4) == pytest.approx(brute_force_sensitivity(crossing, 2, 4))
    with pytest.raises(ValueError, match="k >= 1"):
        sensitivity(crossing, 0, 2)


def test_single_tree_sensitivity_equals_tensorflow_privacys_accountant():
    """Their recursion over (count, start, end slack), for one tree without restarts."""
    import importlib.util

    # the accountant needs only numpy and dp_accounting; its package's __init__ would load TensorFlow
    package = Path(importlib.util.find_spec("tensorflow_privacy").origin).parent
    path = package / "privacy" / "analysis" / "tree_aggregation_accountant.py"
    spec = importlib.util.spec_from_file_location("tree_aggregation_accountant", path)
    accountant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accountant)
    for n, b, k in [(64, 5, 4), (100, 7, 6), (150, 12, 8)]:
        theirs = accountant._max_tree_sensitivity_square_sum(k, b - 1, n)   # their min_separation: rounds between
        assert tree_sensitivity(n, n, k, b) ** 2 == pytest.approx(theirs, abs=1e-9)


def test_restarts_every_b_rounds_or_fewer_make_the_gram_banded_and_both_methods_agree():
    strategy = tree_strategy(300, 16)
    gram = (strategy.T @ strategy).tocoo()
    assert np.abs(gram.row - gram.col).max() == 15
    diagonal = sparse.diags(np.sqrt(np.asarray((strategy.T @ strategy).diagonal())))
    for k, b in [(3, 16), (20, 17), (5, 40)]:      # the diagonal strategy has only the banded method
        assert sensitivity(strategy, k, b) == pytest.approx(sensitivity(diagonal, k, b), rel=1e-12)
    assert sensitivity(strategy, 20, 16) ** 2 == pytest.approx(18 * 5 + 4)   # 18 trees of depth 5, one of 12


# -- ρ and ε -------------------------------------------------------------------------------------------


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The exact δ(ε) of a Gaussian mechanism with mean shift μ (Balle & Wang 2018)."""
    return stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)


def test_rho_and_epsilon_equal_the_hand_computed_figures():
    """8 rounds, one tree of 15 nodes, k = 2, b = 4: two leaves share only the root, so
    Δ² = 4 + 4 + 2·1 = 10. z = 2: ρ = 10/8; σ_b = 1: ρ += 2·(1/2)²/2 = 1/4. ρ = 1.5, μ = √3."""
    spent = ftrl_spent(2.0, 1.0, rounds_so_far=8, horizon=8, k=2, b=4, delta=1e-5, restart_every=8)
    assert spent.sensitivity == pytest.approx(math.sqrt(10), rel=1e-12)
    assert spent.rho == pytest.approx(1.5, rel=1e-12)
    exact = optimize.brentq(lambda e: gaussian_delta(e, math.sqrt(3)) - 1e-5, 0.01, 50, xtol=1e-10)
    assert spent.accountant == "pld"
    assert exact - 1e-9 <= spent.epsilon <= exact + 0.01              # PLD: pessimistic by < 1e-2
    assert spent.by_accountant["rdp"] > spent.epsilon
    assert (spent.mechanism, spent.assumption) == ("ftrl", "participation")


def test_horizons_compose_by_adding_rho_and_partial_horizons_spend_less():
    full, _ = horizon_rho(3.0, 5.0, 64, 16, 3, 10)
    partial, _ = horizon_rho(3.0, 5.0, 7, 16, 3, 10)
    assert partial < full
    spent = ftrl_spent(3.0, 5.0, 2 * 64 + 7, 64, 3, 10, 1e-8, 16)
    assert spent.rho == pytest.approx(2 * full + partial, rel=1e-12)
    assert ftrl_spent(3.0, 5.0, 64, 64, 3, 10, 1e-8, 16).epsilon < spent.epsilon
    assert ftrl_spent(0.0, 5.0, 10, 64, 3, 10, 1e-8, 16).epsilon == math.inf
    assert ftrl_spent(3.0, None, 10, 64, 3, 10, 1e-8, 16).rho < ftrl_spent(3.0, 5.0, 10, 64, 3, 10, 1e-8, 16).rho
    assert epsilon_from_rho(0.0, 1e-8)[0] == 0.0


def test_projection_reaches_the_target_with_the_separation_the_fleet_allows():
    p = project(devices=4000, reports_per_round=100, rounds=400, target_epsilon=4.0, delta=1e-8)
    assert (p.separation, p.participations) == (40, 10)
    assert p.restart_every & (p.restart_every - 1) == 0 and p.restart_every == choose_restart(400, 10, 40)
    assert 3.99 < p.epsilon <= 4.0
    again = ftrl_spent(p.noise_multiplier, p.count_stddev, 400, 400, 10, 40, 1e-8, p.restart_every)
    assert again.epsilon == pytest.approx(p.epsilon, rel=1e-9)
    assert p.node_noise_on_mean == pytest.approx(p.noise_multiplier / 100)
    with pytest.raises(ValueError, match="clip count"):
        project(4000, 100, 400, 4.0, 1e-8, count_stddev=0.5)


# -- the noise -----------------------------------------------------------------------------------------


def implied_decoder(strategy: sparse.csr_matrix) -> np.ndarray:
    """B with B·C = I, from C alone: the prefix [0, t] is the sum of the maximal rows inside it
    (the dyadic decomposition), round t's release the difference of two prefixes."""
    c = strategy.toarray()
    start, stop = c.argmax(axis=1), c.shape[1] - c[:, ::-1].argmax(axis=1)
    prefix = np.zeros((c.shape[1], c.shape[0]))
    for t in range(c.shape[1]):
        inside = np.flatnonzero(stop <= t + 1)
        maximal = [r for r in inside if not any(start[o] <= start[r] and stop[r] <= stop[o] and
                                                (start[o], stop[o]) != (start[r], stop[r]) for o in inside)]
        prefix[t, maximal] = 1
    decoder = np.diff(prefix, axis=0, prepend=0)
    np.testing.assert_allclose(decoder @ c, np.eye(c.shape[1]), atol=1e-12)
    return decoder


def node_vectors(tree: TreeNoise, horizons: int, size: int) -> np.ndarray:
    """Every node's vector, in tree_strategy's row order (trees in order, tree_nodes within)."""
    out = []
    for h in range(horizons):
        for start in range(0, tree.horizon, tree.restart_every):
            at = locate(h * tree.horizon + start, tree.horizon, tree.restart_every)
            out += [tree.node_noise(at, node, size) for node in tree_nodes(at.length)]
    return np.array(out)


def covariance_within_three_standard_errors(draws: np.ndarray, expected: np.ndarray) -> bool:
    """Every entry of the sample covariance (columns are independent samples) within 3 SE of expected."""
    d = draws.shape[1]
    sample = draws @ draws.T / d
    se = np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected ** 2) / d)
    return bool(np.all(np.abs(sample - expected) <= 3 * se))


def test_the_noise_is_the_decoder_applied_to_the_nodes_with_the_implied_covariance():
    horizon, restart, size = 12, 8, 20_000                         # trees of 8 and 4 leaves, two horizons
    tree = TreeNoise(KEY, horizon, restart, label="en")
    one = tree_strategy(horizon, restart)
    decoder = sparse.block_diag([implied_decoder(one)] * 2).toarray()
    noise = np.array([tree.unit(t, size) for t in range(2 * horizon)])
    np.testing.assert_allclose(noise, decoder @ node_vectors(tree, 2, size), atol=1e-9)
    implied = decoder @ decoder.T
    assert implied[1, 0] == -1 and implied[3, 3] == 3 and implied[8, 7] == 0   # 3 = leaf 3's 1 + 2 removed
    assert covariance_within_three_standard_errors(noise, implied)
    independent = np.random.default_rng(3).standard_normal(noise.shape) * np.sqrt(
        np.diag(implied))[:, None]                                   # same variances, no correlation
    assert not covariance_within_three_standard_errors(independent, implied)   # the check has power


def test_summed_releases_carry_only_the_prefix_nodes_noise():
    """What makes FTRL work: server SGD on the releases puts log-many nodes into the model."""
    tree = TreeNoise(KEY, 64, 64)
    total = np.cumsum([tree.unit(t, 50) for t in range(13)], axis=0)[-1]     # 13 = 8 + 4 + 1
    at = locate(12, 64, 64)
    nodes = sum(tree.node_noise(at, node, 50) for node in [(3, 0), (2, 2), (0, 12)])
    np.testing.assert_allclose(total, nodes, atol=1e-12)
    assert residual_nodes(12) == ((0, 12), [])


def test_a_mechanism_rebuilt_from_the_key_continues_with_the_same_noise():
    key = new_key()
    before = TreeNoise(key, 100, 16, label="en")
    first = [before.noise(t, 300, 0.7) for t in range(40)]
    del before                                                       # the server restarts at round 23
    after = TreeNoise(key, 100, 16, label="en")
    np.testing.assert_array_equal(np.array(first[23:]), np.array([after.noise(t, 300, 0.7)
                                                                  for t in range(23, 40)]))
    np.testing.assert_array_equal(after.unit(5, 1000)[:301], after.unit(5, 301))   # prefix-stable
    assert not np.allclose(TreeNoise(key, 100, 16, label="fr").unit(5, 10), after.unit(5, 10))
    assert not np.allclose(TreeNoise(new_key(), 100, 16, label="en").unit(5, 10), after.unit(5, 10))
    assert key.hex() not in repr(after) and "en" in repr(after)
    assert starts_tree(32, 100, 16) and starts_tree(100, 100, 16) and not starts_tree(99, 100, 16)
    assert locate(99, 100, 16).length == 4                          # the horizon's last tree: 100 − 96


def test_zero_noise_gives_exactly_the_sum_and_the_source_plugs_into_central_noise():
    from contract.update.pipeline import UpdatePipeline, running_sum
    from contract.update.spec import UpdateSpec

    tree = TreeNoise(KEY, 50, 8)
    total = np.random.default_rng(1).normal(size=33)
    np.testing.assert_array_equal(tree.add(total, 3, 0.0), total)
    deltas = [np.random.default_rng(i).normal(size=16) * 0.05 for i in range(4)]
    means = []
    for stddev in (0.0, 0.3):
        pipeline = UpdatePipeline(UpdateSpec(bits=32, clip_norm=0.1, weighting="uniform").bind(
            16, "0" * 64, "en/5", 5, 0, ("central", stddev, 4)))
        acc = running_sum(pipeline)
        for i, d in enumerate(deltas):
            acc.add(pipeline.accept(pipeline.encode(d, 1, seed=i).body, 1))
        means.append(pipeline.finalize_with_count(acc.total, acc.weight, random=tree.source(5))[0])
    np.testing.assert_allclose(means[1] - means[0], tree.noise(5, 16, 0.3) / 4, atol=1e-12)


# -- TFF's tree_aggregation ----------------------------------------------------------------------------


def tff_tree_rounds(rounds: list[list[np.ndarray]], noise_multiplier: float, clip: float,
                    clients: float) -> np.ndarray:
    import tensorflow as tf

    from models.tff_runtime import tff_session

    size = rounds[0][0].size
    with tff_session() as tff:
        factory = tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
            noise_multiplier=noise_multiplier, clients_per_round=clients, l2_norm_clip=clip,
            record_specs=tf.TensorSpec([size], tf.float32), noise_seed=11, use_efficient=False)
        process = factory.create(tff.TensorType(np.float32, [size]))
        state, out = process.initialize(), []
        for values in rounds:
            step = process.next(state, [v.astype(np.float32) for v in values])
            out.append(np.asarray(step.result, np.float64))
            state = step.state
    return np.array(out)


def test_zero_noise_and_noise_covariance_match_tffs_tree_aggregation():
    g = np.random.default_rng(5)                                     # test data, not noise
    clip, clients, size = 0.2, 4, 32
    rounds = [[g.normal(size=size) * g.uniform(0.01, 0.2) for _ in range(clients)] for _ in range(6)]
    theirs = tff_tree_rounds(rounds, 0.0, clip, clients)
    tree = TreeNoise(KEY, 6, 8)
    ours = [tree.add(sum(v * min(1.0, clip / np.linalg.norm(v)) for v in values), t, 0.0) / clients
            for t, values in enumerate(rounds)]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # with noise: TFF's residual tree noise has the covariance our strategy implies, z² B Bᵀ
    z, big = 1.5, 20_000
    noise = tff_tree_rounds([[np.zeros(big)]] * 8, z, 1.0, 1.0)
    implied = implied_decoder(tree_strategy(8, 8))
    assert covariance_within_three_standard_errors(noise, z ** 2 * implied @ implied.T)
