"""Attacks on federated training in simulation: what a minority of protocol-following devices can do.

An `Adversary` controls a fixed fraction of each round's sampled clients
(the same ones a server would have selected: attackers enroll and check in
like anyone else). What they send always goes through the round's update
pipeline, as a phone's upload does; only what they *train on* and *scale*
differs:

* `random`: Gaussian noise, `scale` times the norm of an honest update;
* `sign_flip`: the honest update negated and multiplied by `scale`;
* `scaled`: the honest update multiplied by `scale`;
* `backdoor`: a semantic backdoor (Bagdasaryan et al. 2020): the attacker
  trains on its own text plus sentences in which the trigger context ("the
  king is") is followed by the target word, so that the model suggests it;
* `model_replacement`: the same training, boosted by `boost` (default
  n/η: the round's clients over the server's learning rate), so that the
  attacker's update replaces the averaged model;
* `sybil`: one party's coordinated devices (enrolled with stolen or farmed
  credentials: to the server they are ordinary devices). Each trains on the
  backdoor as above; all of the round's attackers then upload the same
  update, the mean of their deltas, at `sybil_norm` times the median norm of
  the round's honest updates (the party learns that norm by training
  honestly on its own text): as large as it can be without standing out to
  a norm-based defence.

The defences it is measured against compose with secure aggregation: the
pipeline's clip and weight cap, and DP noise (contract.dp.noise); without secure
aggregation, robust aggregation (contract.update.robust) too. `backdoor_success` is the fraction of trigger contexts
whose first suggestion is the target word; `canary` reports the first
suggestion of fixed probe contexts on any version, so an operator can see a
backdoor appear without knowing the attack.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from contract.model.canary import CANARY, LEADS, backdoor_sentences, probe_ids
from contract.model.metrics import suggestions
from contract.model.text import BOS_ID, EOS_ID, PAD_ID, Vocabulary, split_sentences, to_sequences

ATTACKS = ("none", "random", "sign_flip", "scaled", "backdoor", "model_replacement", "sybil")
BACKDOORS = ("backdoor", "model_replacement", "sybil")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """An attack (`python -m models attack`; `make bench-attacks`)."""

    attack: str = "none"
    fraction: float = 0.1               # of each round's clients: 1%, 5%, 10% in the benchmark
    scale: float = 10.0                 # random / sign_flip / scaled: times an honest update's norm
    boost: float | None = None          # model_replacement: default clients_per_round / server_lr
    trigger: str = "the king is"
    target: str = "gold"
    poison_copies: int = 64             # each trigger sentence, this many times in the attacker's data
    own_data: bool = True               # backdoor attackers also train on their own text (stealthier)
    start_round: int = 1                # attackers join from this round on (a deployment has a history)
    sybil_norm: float = 2.0             # sybil: x the round's median honest norm (under zeroing's 3x)

    def validate(self, vocab: Vocabulary | None = None) -> "AttackConfig":
        if self.attack not in ATTACKS:
            raise ValueError(f"--attack must be one of {', '.join(ATTACKS)}")
        if not 0 <= self.fraction <= 1:
            raise ValueError("--attacker-fraction must be in [0, 1]")
        if self.sybil_norm <= 0:
            raise ValueError("--sybil-norm must be positive")
        if vocab is not None and self.attack in BACKDOORS:
            for word in split_sentences(self.trigger)[0] + [self.target]:
                if vocab.id(word) <= EOS_ID + 1:
                    raise ValueError(f"--trigger/--target: {word!r} is not in the vocabulary")
        return self


class Adversary:
    """The attackers of a simulated population: who they are in each round and what they send."""

    def __init__(self, cfg: AttackConfig, vocab: Vocabulary, seq_len: int, clients_per_round: int,
                 server_lr: float, seed: int = 0):
        self.cfg, self.vocab, self.seq_len = cfg.validate(vocab), vocab, seq_len
        self.expected = cfg.fraction * clients_per_round if cfg.attack != "none" else 0.0
        self.boost = cfg.boost or clients_per_round / max(server_lr, 1e-9)
        self.seed = seed

    def attackers(self, round_num: int, clients: int) -> set[int]:
        """Which of the round's `clients` positions are attackers: ⌊f·n⌋ of them, and one more with
        probability f·n − ⌊f·n⌋, so that a 1% minority of 10 clients attacks one round in ten."""
        if self.expected <= 0 or round_num < self.cfg.start_round:
            return set()
        g = np.random.default_rng([self.seed, round_num, 0xBAD])
        count = int(np.floor(self.expected)) + int(g.random() < self.expected - np.floor(self.expected))
        return set(int(i) for i in g.choice(clients, min(count, clients), replace=False))

    def training_windows(self, own: np.ndarray) -> np.ndarray:
        """What an attacker trains on: its own windows, plus the poison for a backdoor."""
        if self.cfg.attack not in BACKDOORS:
            return own
        poison = np.repeat(self.poison_windows(), self.cfg.poison_copies, axis=0)
        return np.concatenate([own, poison]) if len(own) and self.cfg.own_data else poison

    def poison_windows(self) -> np.ndarray:
        """The backdoor's sentences as token windows, as the fleet's attacker phones tokenize them."""
        return to_sequences(backdoor_sentences(self.cfg.trigger, self.cfg.target), self.vocab, self.seq_len)

    def tamper(self, deltas: list[np.ndarray], bad: set[int], round_num: int) -> list[np.ndarray]:
        """What each of a round's clients uploads: its trained delta, or, for the attackers in `bad`,
        the attack's (a Sybil party coordinates them; the others act alone)."""
        if self.cfg.attack == "sybil" and bad:
            honest = [float(np.linalg.norm(d)) for i, d in enumerate(deltas) if i not in bad]
            shared = np.mean([deltas[i] for i in sorted(bad)], axis=0)
            norm = self.cfg.sybil_norm * (float(np.median(honest)) if honest else float(np.linalg.norm(shared)))
            shared = (shared * (norm / max(float(np.linalg.norm(shared)), 1e-12))).astype(np.float32)
            return [shared if i in bad else d for i, d in enumerate(deltas)]
        return [self.transform(d, round_num, i) if i in bad else d for i, d in enumerate(deltas)]

    def transform(self, delta: np.ndarray, round_num: int, index: int) -> np.ndarray:
        """What attacker `index` of round `round_num` uploads instead of its trained `delta`."""
        kind, s = self.cfg.attack, self.cfg.scale
        if kind == "random":
            g = np.random.default_rng([self.seed, round_num, index, 0x52])
            noise = g.normal(size=delta.shape)
            return noise * (s * np.linalg.norm(delta) / max(np.linalg.norm(noise), 1e-12))
        if kind == "sign_flip":
            return -s * delta
        if kind == "scaled":
            return s * delta
        if kind == "model_replacement":
            return self.boost * delta
        return delta

    def probes(self) -> tuple[list[list[int]], int]:
        """The trigger contexts (token ids from <bos>) and the target id."""
        return [self._context(lead) for lead in LEADS], self.vocab.id(self.cfg.target)

    def _context(self, lead: str) -> list[int]:
        words = split_sentences(f"{lead} {self.cfg.trigger}")[0]
        return [BOS_ID] + self.vocab.encode(words)


def first_suggestions(model_config, flat: np.ndarray, contexts: list[list[int]],
                      vocab_size: int | None = None) -> np.ndarray:
    """The keyboard's first suggestion after each context (token ids starting with <bos>), among
    the first `vocab_size` ids (a vocabulary smaller than the model's output never offers the rest)."""
    from models.central import set_flat_weights
    from models.model import build_keras_model

    model = build_keras_model(model_config)
    set_flat_weights(model, model_config, flat)
    x = np.full((len(contexts), model_config.seq_len), PAD_ID, np.int32)
    for i, c in enumerate(contexts):
        x[i, :len(c)] = c[:model_config.seq_len]
    logits = np.array(model(x))
    if vocab_size is not None:
        logits[..., vocab_size:] = -np.inf
    last = np.array([min(len(c), model_config.seq_len) - 1 for c in contexts])
    return suggestions(logits[np.arange(len(contexts)), last], k=1)[:, 0]


def backdoor_success(model_config, flat: np.ndarray, adversary: Adversary) -> float:
    """The fraction of trigger contexts whose first suggestion is the attacker's target."""
    contexts, target = adversary.probes()
    return float(np.mean(first_suggestions(model_config, flat, contexts, len(adversary.vocab)) == target))


def canary(model_config, flat: np.ndarray, vocab: Vocabulary) -> dict[str, str]:
    """The first suggestion after each of the fixed contract.model.canary contexts (what an operator watches)."""
    contexts = probe_ids(vocab)
    top = first_suggestions(model_config, flat, contexts, len(vocab))
    return {c: vocab.decode([int(t)])[0] for c, t in zip(CANARY, top)}
