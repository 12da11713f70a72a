"""Federated discovery of new words in simulation: TrieHH (contract.tasks.discovery) over the training users.

Each training user of the federated corpus is one device holding its own
words; the protocol's two halves are contract.tasks.discovery's, the same code
the phones and the server run. What a run is judged on is what the server
could never compute in a deployment: the training users' true
out-of-vocabulary words, ranked by how many devices typed each, against
which the discovered words' precision and recall are measured, and the
held-out users' OOV rate before and after the discovered words fill the
vocabulary's free slots.
"""
from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Mapping

from tqdm import tqdm

from contract.tasks.discovery import DiscoverySpec, Trie, candidates, privacy, vote
from contract.model.text import Vocabulary, split_sentences


@dataclasses.dataclass(frozen=True)
class DiscoveryConfig:
    spec: DiscoverySpec = DiscoverySpec()
    devices_per_level: int = 0     # devices sampled at each level (0: every device)
    passes: int = 2                # the found words join the vocabulary between passes
    seed: int = 0                  # the simulation's sampling (phones draw from their CSPRNG)


def device_words(texts: Mapping[str, list[str]], vocab: Vocabulary) -> dict[str, collections.Counter]:
    """Each device's out-of-vocabulary words and how often it typed them."""
    return {c: candidates((w for t in ts for s in split_sentences(t) for w in s), vocab)
            for c, ts in texts.items()}


def devices_per_word(words: Mapping[str, collections.Counter]) -> collections.Counter:
    return collections.Counter(w for counts in words.values() for w in counts)


def true_top(words: Mapping[str, collections.Counter], k: int, max_length: int) -> list[str]:
    """The k OOV words typed by the most devices (ties: alphabetical), discoverable lengths only."""
    df = devices_per_word(words)
    ranked = sorted((w for w in df if len(w) <= max_length), key=lambda w: (-df[w], w))
    return ranked[:k]


def run_discovery(words: Mapping[str, collections.Counter], cfg: DiscoveryConfig,
                  progress: bool = True) -> dict:
    """Every pass level by level; the words found (most voted first), rounds and participations."""
    rng = random.Random(cfg.seed)
    remaining = {c: collections.Counter(ws) for c, ws in words.items()}
    devices = sorted(remaining)
    found: dict[str, int] = {}
    rounds = participations = 0
    bar = tqdm(total=cfg.passes * cfg.spec.levels, desc="discovery levels", unit="level", disable=not progress)
    for _ in range(cfg.passes):
        trie = Trie(cfg.spec)
        while not trie.done:
            sample = devices if not cfg.devices_per_level else rng.sample(devices, min(cfg.devices_per_level,
                                                                                     len(devices)))
            trie.tally([vote(remaining[c], trie.frontier, trie.level, cfg.spec, rng) for c in sample])
            rounds, participations = rounds + 1, participations + len(sample)
            bar.update(1)
        bar.update(cfg.spec.levels - (trie.level - 1))
        new = {w: n for w, n in trie.words.items() if w not in found}
        found.update(new)
        for counts in remaining.values():          # the vocabulary now holds them: no longer OOV
            for w in new:
                counts.pop(w, None)
        if not new:
            break
    bar.close()
    ranked = [w for w, _ in sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {"words": ranked, "votes": found, "rounds": rounds, "participations": participations,
            "privacy": privacy(cfg.spec, len(devices), cfg.devices_per_level or len(devices), cfg.passes)}


def score(found: list[str], truth: list[str], words: Mapping[str, collections.Counter],
          min_devices: int) -> dict:
    """Precision and recall of the first len(truth) found words against the true top words, and how
    many found words fewer than min_devices devices typed (the protocol promises none)."""
    df = devices_per_word(words)
    top, kept = set(truth), found[:len(truth)]
    hits = sum(1 for w in kept if w in top)
    return {"found": len(found), "precision": hits / max(len(kept), 1), "recall": hits / max(len(truth), 1),
            "revealed_below_threshold": sum(1 for w in found if df[w] < min_devices)}
