"""DP-FTRL in simulation (models.dp_ftrl): the contract's pipeline with the tree noise, (k, b)-participation
when clients are chosen, and the summary's ε from the ledger's code (privacy.ftrl), on the tiny config.

* at zero noise the DP-FTRL simulation is the non-DP simulation of the same clipped, unweighted mean;
* every round's clients respect (k, b), checked from what the simulation recorded;
* the summary's ε is `ftrl_spent` of the configuration, this population's or the projected deployment's.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from contract.dp.noise import DPSpec
from contract.model.weights import load_checkpoint
from contract.update.spec import UpdateSpec
from emulation.models import tiny_corpus
from contract.dp.ftrl import TreeNoise
from models.dp_ftrl import FtrlAggregator, Participation, implied, privacy_spent, resolve
from models.model import TINY
from models.simulate import SimulationConfig, run_simulation
from models.tff_runtime import is_alive, worker_processes
from privacy.ftrl import ftrl_spent


@pytest.fixture(scope="module")
def small_corpus():
    return tiny_corpus()


def violations(rounds: list[list[str]], b: int, k: int, n: int, per_round: int) -> list[str]:
    """Every breach of (k, b)-participation in the chosen clients of DP rounds 0, 1, …"""
    out, last, per_horizon = [], {}, {}
    for t, chosen in enumerate(rounds):
        if len(chosen) != per_round or len(set(chosen)) != per_round:
            out.append(f"round {t}: {chosen} is not {per_round} distinct clients")
        for c in chosen:
            if c in last and t - last[c] < b:
                out.append(f"round {t}: {c} took part in round {last[c]}, fewer than b = {b} rounds ago")
            key = (c, t // n)
            per_horizon[key] = per_horizon.get(key, 0) + 1
            if per_horizon[key] > k:
                out.append(f"round {t}: {c}'s participation {per_horizon[key]} in horizon {t // n} (k = {k})")
            last[c] = t
    return out


def test_the_rule_fills_every_round_and_never_breaks_k_or_b():
    clients = [f"c{i:02d}" for i in range(30)]
    for b, k, n, per_round in [(4, 4, 20, 5), (6, 2, 12, 5), (1, 1, 6, 5), (3, 5, 10, 10)]:
        rule = Participation(b, k, n)
        rule.check_feasible(len(clients), per_round, 100)
        g = np.random.default_rng(b)
        rounds = [rule.choose(clients, per_round, t, g) for t in range(100)]
        assert violations(rounds, b, k, n, per_round) == []
        counts = {}
        for t, chosen in enumerate(rounds):
            for c in chosen:
                counts[(c, t // n)] = counts.get((c, t // n), 0) + 1
        assert max(counts.values()) == min(k, -(-n // b), -(-n * per_round // len(clients)))   # the rule bites
    assert violations([["a", "b"], ["b", "c"]], 2, 5, 10, 2) != []      # the checker sees a breach of b
    assert violations([["a"], ["b"], ["a"]], 1, 1, 10, 1) != []         # … and one of k


def test_the_rule_refuses_what_cannot_be_filled():
    with pytest.raises(ValueError, match="min_separation_rounds 4 × 5 clients per round needs at least 20"):
        Participation(4, 3, 20).check_feasible(19, 5, 100)
    with pytest.raises(ValueError, match="max_participations 1: 30 clients cannot fill 20 rounds of 5"):
        Participation(2, 1, 20).check_feasible(30, 5, 100)
    rule = Participation(3, 1, 10)
    rule.choose(["a", "b"], 2, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="DP round 1: only 0 clients may take part"):
        rule.choose(["a", "b"], 1, 1, np.random.default_rng(0))


def test_a_deployment_implies_its_separation_and_participations():
    assert implied(1_000_000, 6_500, 100) == (153, 1)
    assert implied(100_000, 500, 1000) == (200, 5)
    spec = resolve(DPSpec(mechanism="ftrl", noise_multiplier=8.0), 905, 10, 100)
    assert (spec.min_separation_rounds, spec.max_participations, spec.horizon_rounds) == (90, 2, 100)
    assert 1 <= spec.restart_every <= 100


def test_the_release_is_the_clipped_sum_plus_the_trees_noise_over_the_fixed_denominator():
    """FtrlAggregator without TFF: round t's mean is (Σ clipped + z·C·(c/m)·unit(t)) / c, the tree being
    TreeNoise's for the key; the clip estimate moves every round but the tree takes it only at a restart."""
    key, size, clients, m = bytes(range(32)), 40, 4, 400
    spec = DPSpec(mechanism="ftrl", noise_multiplier=3.0, initial_clip=1.0, clipped_count_stddev=0.0,
                  min_separation_rounds=1, max_participations=6, horizon_rounds=6, restart_every=3)
    agg = FtrlAggregator(spec, clients, size, "0" * 64, seed=5, deploy_reports=m, key=key)
    tree = TreeNoise(key, 6, 3, "simulation")
    g = np.random.default_rng(3)                                     # test data, not noise
    clips = []
    for r in range(1, 7):
        deltas = [g.normal(size=size) * s for s in (0.05, 0.1, 0.12, 0.4)]     # 3 of 4 under the clip
        clip = agg.clip
        mean, after = agg.mean(deltas, r)
        clipped = sum(d * min(1.0, clip / np.linalg.norm(d)) for d in deltas)
        noise = tree.noise(r - 1, size, 3.0 * clip * clients / m)
        np.testing.assert_allclose(mean, (clipped + noise) / clients, rtol=0, atol=1e-6)
        clips.append(after)
    assert clips[0] == clips[1] == 1.0 and clips[2] != 1.0           # a new clip only where a tree starts
    assert clips[2] == clips[3] == clips[4] and clips[5] != clips[2]


def weights_after(corpus, sim, out) -> np.ndarray:
    run_simulation(corpus, TINY, sim, out)
    return load_checkpoint(out / "final.safetensors")[1]


def test_at_zero_noise_dp_ftrl_is_the_plain_clipped_unweighted_mean(small_corpus, tmp_path):
    clients, clip = len(small_corpus.train), 1.57     # about the median update norm
    update = UpdateSpec(bits=32, rotation=False, clip_norm=clip, weighting="uniform")
    base = SimulationConfig(rounds=2, clients_per_round=clients, batch_size=8, client_lr=1.0,
                            server_optimizer="sgd", server_lr=1.0, eval_every=2, update=update)
    spec = DPSpec(mechanism="ftrl", noise_multiplier=0.0, initial_clip=clip, clip_learning_rate=0.0,
                  clipped_count_stddev=0.0, min_separation_rounds=1, max_participations=2, horizon_rounds=2)
    plain = weights_after(small_corpus, base, tmp_path / "plain")
    ftrl = weights_after(small_corpus, dataclasses.replace(base, dp=spec), tmp_path / "ftrl")
    norms = [json.loads(line)["update_norms"] for line in (tmp_path / "ftrl" / "metrics.jsonl").open()
             if '"train"' in line]
    assert any(n > clip for r in norms for n in r) and any(n < clip for r in norms for n in r)   # clip bites
    initial = load_checkpoint(tmp_path / "plain" / "checkpoints" / "round_0000.safetensors")[1]
    assert np.abs(plain - initial).max() > 1e-3                  # the rounds moved the model
    np.testing.assert_allclose(ftrl, plain, rtol=0, atol=1e-6)
    assert not [p for p in worker_processes() if is_alive(p)]


def test_clients_respect_k_and_b_and_the_summary_spends_ftrl_spent(small_corpus, tmp_path):
    clients = len(small_corpus.train)                               # 18
    b, k, n, per_round, rounds = 2, 2, 8, 4, 10
    spec = DPSpec(mechanism="ftrl", noise_multiplier=1.0, initial_clip=0.05, clipped_count_stddev=1.0,
                  min_separation_rounds=b, max_participations=k, horizon_rounds=n, restart_every=4)
    sim = SimulationConfig(rounds=rounds, clients_per_round=per_round, batch_size=8, client_lr=1.0,
                           server_optimizer="sgd", server_lr=1.0, eval_every=rounds, dp=spec)
    summary = run_simulation(small_corpus, TINY, sim, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"train"' in line]
    chosen = [r["participants"] for r in rows]
    assert len(chosen) == rounds and violations(chosen, b, k, n, per_round) == []
    first = [c for r in chosen[:n] for c in r]
    assert max(first.count(c) for c in first) == k                  # 32 places for 18 clients: k is reached
    assert rows[-1]["dp_clip"] != 0.05                              # the clip moved at the restart
    spent = summary["dp"]
    want = ftrl_spent(1.0, 1.0, rounds, n, k, b, clients ** -1.1, 4)
    assert spent["epsilon"] == pytest.approx(want.epsilon) and spent["rho"] == pytest.approx(want.rho)
    assert (spent["mechanism"], spent["assumption"], spent["projection"]) == ("ftrl", "participation", False)
    assert (spent["separation"], spent["max_participations"], spent["horizon"]) == (b, k, n)
    assert not [p for p in worker_processes() if is_alive(p)]


def test_a_projection_spends_the_deployments_epsilon_and_says_so():
    spec = resolve(DPSpec(mechanism="ftrl", noise_multiplier=8.0), 1_000_000, 6_500, 100)
    sim = SimulationConfig(rounds=100, clients_per_round=10, dp=spec, dp_deploy_reports=6_500,
                           dp_population=1_000_000, dp_delta=1e-10)
    spent = privacy_spent(sim, 905, 100)
    want = ftrl_spent(8.0, 325.0, 100, 100, 1, 153, 1e-10, spec.restart_every)
    assert spent["epsilon"] == pytest.approx(want.epsilon) and 1 < spent["epsilon"] < 3
    assert spent["projection"] and (spent["separation"], spent["max_participations"]) == (153, 1)
    assert spent["simulated_cohort"] == {"clients": 905, "per_round": 10, "separation": 90,
                                         "max_participations": 2}
    assert spent["node_noise_on_mean"] == pytest.approx(8.0 / 6_500)


@pytest.mark.parametrize("flags, message", [
    (["--dp-noise-multiplier", "1", "--dp-min-separation-rounds", "3"],
     "--dp-min-separation-rounds needs --dp-mechanism ftrl"),
    (["--dp-mechanism", "ftrl", "--dp-noise-multiplier", "4", "--dp-deploy-reports", "500"],
     "--dp-deploy-reports and --dp-population go together"),
    (["--dp-mechanism", "ftrl", "--dp-noise-multiplier", "4", "--dp-horizon-rounds", "0"],
     "--dp-horizon-rounds must be >= 1"),
])
def test_simulate_refuses_ftrl_flags_by_name(flags, message, capsys):
    from models.__main__ import main

    assert main(["simulate", "--config", "tiny", *flags]) == 2
    assert message in capsys.readouterr().err
