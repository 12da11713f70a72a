"""The phone's part in federated discovery of new words: its votes at one level of a pass.

The phone takes the words of its stored text that its vocabulary (the
assignment's) maps to `<oov>`, and votes for up to `votes_per_device` of
their prefixes that extend what the server published by one character,
drawn from the OS CSPRNG (contract.tasks.discovery.vote). Nothing else of the text
goes anywhere: a vote is a prefix the server asked about plus one character.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable

from contract.tasks.discovery import candidates, vote
from contract.model.text import Vocabulary, split_sentences
from contract.protocol.wire import DiscoveryAsk


def votes(ask: DiscoveryAsk, texts: Iterable[str], vocab: Vocabulary) -> list[str]:
    """The device's ballot for `ask` from its own `texts`."""
    typed = (w for t in texts for sentence in split_sentences(t) for w in sentence)
    return vote(candidates(typed, vocab), ask.prefixes, ask.level, ask.spec, secrets.SystemRandom())
