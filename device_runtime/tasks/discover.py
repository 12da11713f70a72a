"""The discover kind: the phone's votes at one level of a pass of federated discovery of new words.

No plan and no checkpoint: the phone downloads the assignment's vocabulary,
takes the words of its stored text that the vocabulary maps to `<oov>`, and
votes for up to `votes_per_device` of their prefixes that extend what the
server published by one character, drawn from the OS CSPRNG
(contract.tasks.discovery.vote). Nothing else of the text goes anywhere: a
vote is a prefix the server asked about plus one character.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING

from contract.model.text import Vocabulary, split_sentences
from contract.protocol.wire import DiscoveryAsk
from contract.tasks.discovery import candidates, vote
from device_runtime.errors import TaskFailed

if TYPE_CHECKING:
    from device_runtime.task import Task
    from device_runtime.tasks import Send


class Discover:
    name = "discover"

    def compute(self, task: "Task", work: None) -> "Send":
        assignment = task.assignment
        if assignment.vocab is None or assignment.discovery is None:
            raise TaskFailed("error", "a discover task needs a vocabulary and a level")
        vocab = Vocabulary.load(task.device.cache.get(assignment.vocab))   # still the download phase
        task.next_phase("discover")
        ballot = votes(assignment.discovery, task.texts, vocab)
        task.interrupt_if_stopped(0)
        client = task.device.client
        return lambda masker: client.report_discovery(assignment, ballot)


def votes(ask: DiscoveryAsk, texts: Iterable[str], vocab: Vocabulary) -> list[str]:
    """The device's ballot for `ask` from its own `texts`."""
    typed = (w for t in texts for sentence in split_sentences(t) for w in sentence)
    return vote(candidates(typed, vocab), ask.prefixes, ask.level, ask.spec, secrets.SystemRandom())


DISCOVER = Discover()
