"""DP-FTRL in simulation: the server's tree noise on the contract's pipeline, and (k, b)-participation.

`python -m models simulate --dp-mechanism ftrl` runs what a DP-FTRL
population runs (issue 32), on the same code:

* each round's clients are chosen under the participation rule the server
  enforces (`Participation`): no client that took part in the last b − 1 DP
  rounds, none that took part k times in the current horizon of n rounds.
  The ε then rests on what the simulation did, not on a sampling assumption;
* each client's update goes through `contract.update.pipeline.UpdatePipeline`
  bound with `dp_mechanism = "ftrl"` (clip, weight 1, quantization, the exact
  sum), and the server's decoder adds the round's share of the tree noise
  (`contract.dp.ftrl.TreeNoise`, keyed from the OS CSPRNG) before the fixed
  denominator;
* the adaptive clip is estimated every round from the noised unclipped count
  (`contract.dp.noise.next_clip`, as `adapt_clip` does), and the tree takes a
  new clip only where a tree starts (`contract.dp.ftrl.starts_tree`): with a
  constant clip the tree's noise telescopes in the model, as in TFF's
  `tree_adaptive`.

The noise multiplier z is each tree node's stddev over the clip (privacy.ftrl),
not DP-FedAvg's total: the clip count's σ_b is separate (default 0.05 × reports).

A *projection* (`dp_deploy_reports` m, `dp_population` N) adds the noise a
deployment of N devices with m reports per round would put on its mean (node
stddev z·C·c/m on this simulation's sum of c), and its ε is that deployment's,
with its own separation b = ⌊N/m⌋ and k = ⌈n/b⌉ unless set; the simulation's
cohort meanwhile obeys the rule its own size implies (⌊clients/c⌋ apart).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from contract.dp.ftrl import TreeNoise, new_key, starts_tree
from contract.dp.noise import DPSpec, SecureRandom, next_clip
from contract.update.pipeline import UpdatePipeline, running_sum
from contract.update.spec import UpdateSpec, rotation_seed
from privacy.sensitivity import max_participations

ASSUMPTION_TEXT = ("no sampling assumption: at most k participations per horizon of n DP rounds, any two at "
                   "least b rounds apart (enforced when each round's clients are chosen)")


def implied(population: int, reports: int, horizon: int) -> tuple[int, int]:
    """(b, k) that N devices with m reports per round can enforce over n rounds: b = ⌊N/m⌋, k = ⌈n/b⌉."""
    b = population // reports
    if b < 1:
        raise ValueError(f"{population} devices cannot fill rounds of {reports} reports")
    return b, max_participations(horizon, horizon, b)


def resolve(spec: DPSpec, population: int, reports: int, rounds: int, separation: int | None = None,
            participations: int | None = None, horizon: int | None = None) -> DPSpec:
    """`spec` with its participation settings filled in: the horizon defaults to `rounds`, b and k to
    what `population` and `reports` imply, the tree's restart to `privacy.ftrl.choose_restart`'s."""
    n = horizon or rounds
    b = separation or implied(population, reports, n)[0]
    k = participations or max_participations(n, n, b)
    return settled(dataclasses.replace(spec, min_separation_rounds=b, max_participations=k, horizon_rounds=n))


def settled(spec: DPSpec) -> DPSpec:
    """`spec` (validated) with its tree's restart chosen if it is 0 (`privacy.ftrl.choose_restart`)."""
    from privacy.ftrl import choose_restart

    spec.validate("--dp")
    if spec.restart_every:
        return spec
    restart = choose_restart(spec.horizon_rounds, spec.max_participations, spec.min_separation_rounds)
    return dataclasses.replace(spec, restart_every=min(restart, spec.horizon_rounds))   # the same tree


class Participation:
    """(k, b)-participation as the server enforces it, on the simulation's clients.

    DP rounds are numbered from 0; horizons are [h·n, (h + 1)·n). `choose` takes
    the round's clients from those eligible, fewest participations in this
    horizon first (uniformly among equals, as `rng.choice` samples when every
    client is eligible and unused), so that rounds fill whenever clients ≥ b·c
    and clients·k ≥ n·c; `taken` keeps every client's rounds.
    """

    def __init__(self, separation: int, participations: int, horizon: int):
        self.b, self.k, self.n = int(separation), int(participations), int(horizon)
        self.taken: dict[str, list[int]] = {}

    def check_feasible(self, clients: int, per_round: int, rounds: int) -> None:
        """ValueError naming the setting if `clients` cannot fill `rounds` rounds of `per_round` under it."""
        if clients < self.b * per_round:
            raise ValueError(f"--dp.min_separation_rounds {self.b} × {per_round} clients per round needs at least "
                             f"{self.b * per_round} training clients (there are {clients})")
        if clients * self.k < min(rounds, self.n) * per_round:
            raise ValueError(f"--dp.max_participations {self.k}: {clients} clients cannot fill "
                             f"{min(rounds, self.n)} rounds of {per_round} in a horizon")

    def count(self, client: str, t: int) -> int:
        start = t - t % self.n
        return sum(start <= s < t for s in self.taken.get(client, ()))

    def eligible(self, client: str, t: int) -> bool:
        rounds = self.taken.get(client, ())
        return (not rounds or t - rounds[-1] >= self.b) and self.count(client, t) < self.k

    def choose(self, clients: list[str], per_round: int, t: int, rng: np.random.Generator) -> list[str]:
        """`per_round` eligible clients for DP round `t` (recorded as taken)."""
        pool = [c for c in clients if self.eligible(c, t)]
        if len(pool) < per_round:
            raise ValueError(f"DP round {t}: only {len(pool)} clients may take part under (k={self.k}, "
                             f"b={self.b}); {per_round} are needed")
        chosen: list[str] = []
        for used in sorted({self.count(c, t) for c in pool}):
            tier = [c for c in pool if self.count(c, t) == used]
            take = min(per_round - len(chosen), len(tier))
            chosen += [tier[i] for i in rng.choice(len(tier), take, replace=False)]
            if len(chosen) == per_round:
                break
        for c in chosen:
            self.taken.setdefault(c, []).append(t)
        return chosen


def cohort_rule(sim, training_clients: int) -> Participation | None:
    """The rule the simulation's own cohort obeys (None unless DP-FTRL): the spec's (k, b) when the ε
    is this population's, what the cohort's size implies when the run is a projection."""
    if sim.dp is None or sim.dp.mechanism != "ftrl":
        return None
    n = sim.dp.horizon_rounds
    if sim.dp_deploy_reports is None:
        rule = Participation(sim.dp.min_separation_rounds, sim.dp.max_participations, n)
    else:
        rule = Participation(*implied(training_clients, sim.clients_per_round, n), n)
    rule.check_feasible(training_clients, sim.clients_per_round, sim.rounds)
    return rule


class FtrlAggregator:
    """The server's DP-FTRL round on the contract's pipeline, for a simulated cohort of `clients`.

    `key`: the tree's secret (a fresh one from the OS CSPRNG by default); `deploy_reports`: a
    projection, as in models.fedavg.DPAggregator. Rounds are numbered from 1 (DP round t = r − 1).
    """

    def __init__(self, spec: DPSpec, clients: int, size: int, layout_sha256: str, seed: int,
                 update: UpdateSpec = UpdateSpec(bits=32), deploy_reports: int | None = None,
                 key: bytes | None = None):
        self.spec, self.clients, self.size, self.layout_sha256, self.seed = settled(spec), clients, size, \
            layout_sha256, seed
        self.update = dataclasses.replace(update, weighting="uniform", zeroing=0.0)
        self.scale = clients / deploy_reports if deploy_reports else 1.0
        expected = deploy_reports or clients
        self.count_stddev = (0.05 * expected if spec.clipped_count_stddev is None
                             else float(spec.clipped_count_stddev)) * self.scale
        self.tree = TreeNoise(key or new_key(), self.spec.horizon_rounds, self.spec.restart_every, "simulation")
        self.clip = self.estimate = spec.initial_clip
        self.random = SecureRandom()

    def round_spec(self, round_num: int):
        update = dataclasses.replace(self.update, clip_norm=self.clip)
        stddev = self.spec.noise_multiplier * self.clip * self.scale
        return update.bind(self.size, self.layout_sha256, f"simulation/{round_num}",
                           rotation_seed(self.seed, round_num), 0, ("ftrl", stddev, self.clients, self.count_stddev))

    def mean(self, deltas: list[np.ndarray], round_num: int = 0) -> tuple[np.ndarray, float]:
        """The released mean of the clipped `deltas` (tree noise, fixed denominator) and the next round's clip."""
        t = round_num - 1
        pipeline = UpdatePipeline(self.round_spec(round_num))
        total = running_sum(pipeline)
        for i, delta in enumerate(deltas):
            encoded = pipeline.encode(delta, 1, seed=(round_num << 20) + i)
            total.add(pipeline.accept(encoded.body, encoded.weight))
        if total.updates == 0:
            raise ValueError(f"round {round_num}: no update to release (DP-FTRL releases every DP round)")
        mean, unclipped = pipeline.finalize_with_count(total.total, total.weight, random=self.tree.source(t))
        centered = unclipped - 0.5 * len(deltas)
        if self.count_stddev > 0:
            centered += float(self.random.normal(1, self.count_stddev)[0])
        self.estimate = next_clip(self.estimate, centered, self.clients, self.spec)
        if starts_tree(t + 1, self.spec.horizon_rounds, self.spec.restart_every):
            self.clip = self.estimate
        return mean, self.clip


def privacy_spent(sim, training_clients: int, rounds: int) -> dict:
    """The ledger's figure for `rounds` DP-FTRL rounds of `sim` (privacy.ftrl.ftrl_spent), with the
    participation it rests on: this population's, or the projected deployment's."""
    from privacy.ftrl import ftrl_spent

    spec = settled(sim.dp)
    population = sim.dp_population or training_clients
    reports = sim.dp_deploy_reports or sim.clients_per_round
    delta = sim.dp_delta or population ** -1.1
    count_stddev = 0.05 * reports if spec.clipped_count_stddev is None else float(spec.clipped_count_stddev)
    spent = ftrl_spent(spec.noise_multiplier, count_stddev, rounds, spec.horizon_rounds,
                       spec.max_participations, spec.min_separation_rounds, delta, spec.restart_every)
    out = {**spent.to_json(), "noise_multiplier": spec.noise_multiplier, "clipped_count_stddev": count_stddev,
           "population": population, "reports_per_round": reports, "projection": sim.dp_deploy_reports is not None,
           "separation": spec.min_separation_rounds, "max_participations": spec.max_participations,
           "horizon": spec.horizon_rounds, "restart_every": spec.restart_every,
           "assumption_text": ASSUMPTION_TEXT}
    rule = cohort_rule(sim, training_clients)
    out["simulated_cohort"] = {"clients": training_clients, "per_round": sim.clients_per_round,
                               "separation": rule.b, "max_participations": rule.k}
    if out["projection"]:
        out["node_noise_on_mean"] = spec.noise_multiplier / reports        # in clips
    return out
