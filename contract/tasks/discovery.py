"""Federated discovery of new words (TrieHH, Zhu et al. 2020): a word is revealed only when at least
`min_devices` devices vote for it, and a device only ever sends prefixes the server asked about.

The phone's half (`candidates`, `vote`) and the server's (`Trie`), shared by
the simulation (models/discovery.py) and, over HTTP, by the phone runtime and
the server. A discovery pass goes level by level:

* level r: the server publishes its trie's frontier, the prefixes of length
  r − 1 it has found (level 1: the empty prefix). A word ends with END, so a
  whole word is itself a prefix ("hamlet$").
* each device takes its own out-of-vocabulary words (the words its model's
  vocabulary maps to `<oov>`, of the tokenizer's form and at most
  `max_word_length` long), keeps those extending a published prefix, and
  votes for the length-r prefixes of up to `votes_per_device` of them,
  distinct, drawn without replacement by how often it typed them, from the
  phone's CSPRNG. Nothing else of its text leaves the phone: a vote is one
  character longer than a prefix the server published.
* the server counts each device's votes once per prefix and adds to the
  trie every prefix with at least `min_devices` votes.

A prefix voted by fewer than min_devices devices never joins the trie, and
a device votes for a prefix only if it typed a word starting with it, so a
word typed by fewer than min_devices devices is never revealed, whatever
the sampling. With one vote per device and devices sampled with probability
γ < 1/θ at each level (θ = min_devices, L + 1 levels), TrieHH is (ε, δ)-DP
(Zhu et al. 2020, Corollary 1): ε = (L + 1) · ln(1 / (1 − γθ)) per pass, and
δ = (θ − 2) / ((θ − 3) · θ!). More votes per device find more words, with
the min_devices guarantee only (`privacy` says which holds).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import random
import re
from collections.abc import Iterable, Mapping

END = "$"
_CANDIDATE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")      # contract.model.text's word form
_PREFIX = re.compile(r"[a-z0-9][a-z0-9']*\$?")             # the start of one, or one and END


@dataclasses.dataclass(frozen=True)
class DiscoverySpec:
    min_devices: int = 10          # θ: votes a prefix needs; no word of fewer devices is ever revealed
    max_word_length: int = 12      # L: longer words are not discovered (a pass has L + 1 levels)
    votes_per_device: int = 1      # distinct prefixes a device votes for per level (1: TrieHH's DP holds)

    def validate(self) -> "DiscoverySpec":
        if not (isinstance(self.min_devices, int) and self.min_devices >= 2):
            raise ValueError("discovery.min_devices must be an integer >= 2")
        if not (isinstance(self.max_word_length, int) and 1 <= self.max_word_length <= 40):
            raise ValueError("discovery.max_word_length must be an integer in [1, 40]")
        if not (isinstance(self.votes_per_device, int) and 1 <= self.votes_per_device <= 1000):
            raise ValueError("discovery.votes_per_device must be an integer in [1, 1000]")
        return self

    @property
    def levels(self) -> int:
        return self.max_word_length + 1


def privacy(spec: DiscoverySpec, population: int, devices_per_level: int, passes: int = 1) -> dict:
    """The guarantee a discovery run gives: always the min_devices threshold; (ε, δ) when TrieHH's
    analysis applies (one vote per device, a sampling rate γ = devices_per_level / population < 1/θ,
    θ > 3), composed over `passes` passes."""
    theta, gamma = spec.min_devices, devices_per_level / max(population, 1)
    out = {"min_devices": theta, "epsilon": None, "delta": None}
    if spec.votes_per_device == 1 and theta > 3 and gamma * theta < 1:
        out["epsilon"] = passes * spec.levels * math.log(1 / (1 - gamma * theta))
        out["delta"] = passes * (theta - 2) / ((theta - 3) * math.factorial(theta))
    return out


# -- the phone's half ------------------------------------------------------------------------


def candidates(typed: Iterable[str], known) -> collections.Counter:
    """How often each of the device's words that `known` (a vocabulary: `id(word) == OOV`) does not
    hold was typed; `typed` are the device's words, in order."""
    from contract.model.text import OOV_ID

    counts = collections.Counter(w for w in typed if _CANDIDATE.fullmatch(w))
    return collections.Counter({w: n for w, n in counts.items() if known.id(w) == OOV_ID})


def vote(words: Mapping[str, int], prefixes: Iterable[str], level: int, spec: DiscoverySpec,
         rng: random.Random) -> list[str]:
    """The device's votes at `level`: up to votes_per_device distinct length-`level` prefixes of its
    words (each + END) that extend a published prefix, drawn by how often it typed them."""
    published = set(prefixes)
    weights: collections.Counter = collections.Counter()
    for w, n in words.items():
        word = w + END
        if len(w) <= spec.max_word_length and len(word) >= level and word[:level - 1] in published:
            weights[word[:level]] += n
    chosen: list[str] = []
    while weights and len(chosen) < spec.votes_per_device:
        pick = rng.choices(list(weights), weights=list(weights.values()))[0]
        chosen.append(pick)
        del weights[pick]
    return chosen


# -- the server's half -----------------------------------------------------------------------


class Trie:
    """What a discovery pass has found: the frontier of the next level, and the words."""

    def __init__(self, spec: DiscoverySpec):
        self.spec = spec.validate()
        self.level = 1
        self.frontier: list[str] = [""]
        self.words: dict[str, int] = {}       # word → the votes its last level got

    @property
    def done(self) -> bool:
        return not self.frontier or self.level > self.spec.levels

    def check(self, ballot: Iterable[str]) -> list[str]:
        """One device's votes, checked: ValueError unless each extends a published prefix by one
        character, is distinct, and they are at most votes_per_device."""
        ballot = list(ballot)
        published = set(self.frontier)
        if len(ballot) > self.spec.votes_per_device or len(set(ballot)) != len(ballot):
            raise ValueError(f"at most {self.spec.votes_per_device} distinct votes")
        for p in ballot:
            if not isinstance(p, str) or len(p) != self.level or p[:-1] not in published or \
                    not _PREFIX.fullmatch(p):
                raise ValueError(f"{p!r} does not extend a prefix of level {self.level - 1} by one character")
        return ballot

    def tally(self, ballots: Iterable[Iterable[str]]) -> list[str]:
        """Close the level with these devices' ballots; the prefixes (and words) it added."""
        return self.advance(collections.Counter(p for b in ballots for p in set(self.check(b))))

    def advance(self, votes: Mapping[str, int]) -> list[str]:
        """Close the level with its vote counts (each from checked ballots): what it added."""
        found = sorted(p for p, n in votes.items() if n >= self.spec.min_devices)
        for p in found:
            if p.endswith(END):
                self.words[p[:-1]] = votes[p]
        self.frontier = [p for p in found if not p.endswith(END)]
        self.level += 1
        return found

    @classmethod
    def resume(cls, spec: DiscoverySpec, level: int, frontier: Iterable[str], words: Mapping[str, int]) -> "Trie":
        """A pass in progress, as the server stored it."""
        trie = cls(spec)
        trie.level, trie.frontier, trie.words = level, list(frontier), dict(words)
        return trie

    def ranked(self) -> list[str]:
        """The words found, most voted first (ties: alphabetical)."""
        return [w for w, _ in sorted(self.words.items(), key=lambda kv: (-kv[1], kv[0]))]
