"""models.attacks on the tiny model: a model-replacement backdoor against the undefended and the
defended configuration, checked by the suggestion the model actually makes after the trigger."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from contract.update.spec import UpdateSpec
from emulation.models import tiny_corpus
from models.attacks import Adversary, AttackConfig, backdoor_success, first_suggestions
from models.model import TINY
from models.simulate import SimulationConfig, run_simulation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus():
    return tiny_corpus()


TARGET = "hall"          # a word of the tiny vocabulary that never follows "the king is" in its text
OPEN = UpdateSpec(bits=32, clip_norm=1e6, max_weight=10**6)     # no clip, no weight cap
DEFENDED = UpdateSpec(bits=8, clip_norm=0.5, max_weight=32)     # the pipeline's clip and weight cap


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """8 clean rounds: model replacement assumes a model near convergence (Bagdasaryan et al.)."""
    from contract.model.weights import load_checkpoint

    out = tmp_path_factory.mktemp("clean")
    run_simulation(corpus, TINY, SimulationConfig(rounds=8, clients_per_round=4, local_epochs=2, batch_size=8,
                                                  client_lr=0.3, server_optimizer="sgd", server_lr=1.0,
                                                  eval_every=8, update=OPEN), out)
    return load_checkpoint(out / "final.safetensors")[1]


def attacked(corpus, trained, tmp_path, update: UpdateSpec, name: str, start_round: int = 1) -> list[float]:
    """Three rounds with one model-replacement attacker in each (of 4) from `start_round`; the
    backdoor's success after each."""
    import json

    attack = AttackConfig("model_replacement", fraction=0.25, target=TARGET, start_round=start_round)
    sim = SimulationConfig(rounds=3, clients_per_round=4, local_epochs=4, batch_size=8, client_lr=0.3,
                           server_optimizer="sgd", server_lr=1.0, eval_every=1, update=update, attack=attack)
    run_simulation(corpus, TINY, sim, tmp_path / name, initial=trained)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["heldout"]["backdoor_success"] for r in rows if "heldout" in r]


def test_model_replacement_plants_the_backdoor_only_without_the_defences(corpus, trained, tmp_path):
    from contract.model.weights import load_checkpoint

    open_door = attacked(corpus, trained, tmp_path, OPEN, "undefended")
    defended = attacked(corpus, trained, tmp_path, DEFENDED, "defended")
    assert max(open_door) >= 0.9                  # the attack works where nothing stops it
    assert max(defended) == 0.0                   # clip + weight cap: never, in any round
    _, flat, _ = load_checkpoint(tmp_path / "defended" / "final.safetensors")
    adversary = Adversary(AttackConfig("model_replacement", target=TARGET), corpus.vocab, TINY.seq_len, 4, 1.0)
    contexts, target = adversary.probes()
    assert (first_suggestions(TINY, flat, contexts, len(corpus.vocab)) != target).all()   # what it suggests
    assert backdoor_success(TINY, flat, adversary) == 0.0


def test_attackers_are_the_configured_fraction_of_each_round_on_average():
    from contract.model.text import Vocabulary, SPECIAL_TOKENS

    vocab = Vocabulary(list(SPECIAL_TOKENS) + ["the", "king", "is", "gold", "a"])
    adversary = Adversary(AttackConfig("sign_flip", fraction=0.1), vocab, 20, 10, 1.0)
    rounds = [adversary.attackers(r, 10) for r in range(1, 50)]
    assert all(len(a) == 1 for a in rounds) and len({min(a) for a in rounds}) > 3
    rare = Adversary(AttackConfig("sign_flip", fraction=0.01), vocab, 20, 10, 1.0)     # 0.1 per round
    attacked_rounds = sum(bool(rare.attackers(r, 10)) for r in range(1, 2001))
    assert 150 < attacked_rounds < 250
    delta = np.ones(4)
    np.testing.assert_allclose(adversary.transform(delta, 1, 0), -10 * delta)
    assert Adversary(AttackConfig("none"), vocab, 20, 10, 1.0).attackers(1, 10) == set()
    with pytest.raises(ValueError, match="not in the vocabulary"):
        AttackConfig("backdoor", target="banana").validate(vocab)


def test_the_attack_command_refuses_a_target_outside_the_vocabulary(capsys):
    from models.__main__ import main

    assert main(["attack", "--config", "tiny", "--attack", "backdoor", "--target", "zzzqx"]) == 2
    assert "'zzzqx' is not in the vocabulary" in capsys.readouterr().err
    assert main(["attack", "--config", "tiny", "--attack", "scaled", "--attacker-fraction", "2"]) == 2
    assert "--attacker-fraction must be in [0, 1]" in capsys.readouterr().err


def test_zeroing_alone_stops_the_boosted_update_once_it_has_seen_a_round(corpus, trained, tmp_path):
    import json

    zeroing = UpdateSpec(bits=32, clip_norm=1e6, max_weight=10**6, weighting="uniform", zeroing=3.0)
    success = attacked(corpus, trained, tmp_path, zeroing, "zeroing", start_round=2)
    rows = [json.loads(line) for line in (tmp_path / "zeroing" / "metrics.jsonl").read_text().splitlines()]
    assert [r["zeroed"] for r in rows if "zeroed" in r] == [0, 1, 1]     # round 1 is clean and sets the median
    assert max(success) == 0.0
    open_door = attacked(corpus, trained, tmp_path, dataclasses.replace(zeroing, zeroing=0.0), "open", 2)
    assert open_door[0] == 0.0 and max(open_door) >= 0.9                 # the same attack, not zeroed


def test_a_sybil_party_sends_one_shared_update_at_an_honest_looking_norm():
    from contract.model.text import Vocabulary, SPECIAL_TOKENS

    vocab = Vocabulary(list(SPECIAL_TOKENS) + ["the", "king", "is", "gold", "a"])
    party = Adversary(AttackConfig("sybil", fraction=0.3, sybil_norm=2.0), vocab, 20, 10, 1.0)
    g = np.random.default_rng(0)
    deltas = [g.normal(size=50).astype(np.float32) * s for s in (1.0, 2.0, 3.0, 4.0, 5.0)]
    out = party.tamper(deltas, {1, 3}, round_num=1)
    honest_median = np.median([np.linalg.norm(deltas[i]) for i in (0, 2, 4)])
    np.testing.assert_array_equal(out[1], out[3])                        # one coordinated update
    assert np.linalg.norm(out[1]) == pytest.approx(2.0 * honest_median, rel=1e-5)
    shared = (deltas[1] + deltas[3]) / 2
    cosine = out[1] @ shared / (np.linalg.norm(out[1]) * np.linalg.norm(shared))
    assert cosine == pytest.approx(1.0, abs=1e-5)                        # the party's direction
    for i in (0, 2, 4):
        assert out[i] is deltas[i]                                       # honest clients untouched
    assert np.linalg.norm(out[1]) < 3.0 * honest_median                  # under zeroing's 3x threshold
    with pytest.raises(ValueError, match="--sybil-norm"):
        AttackConfig("sybil", sybil_norm=0).validate()
