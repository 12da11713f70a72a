"""The standing canary: fixed probe contexts whose first suggestion is recorded for every version.

A backdoor (models.attacks) makes the model suggest a chosen word after a
trigger context. An operator does not know the trigger in advance, so every
new version — in simulation at every evaluation, and on the server for each
published app model (tflite_export computes it with the real interpreter and
puts it in the manifest) — is asked for its first suggestion after the same
common contexts. `changed` says which of them moved since the last version:
a probe that suddenly suggests an odd word is the thing to look at.
TensorFlow-free.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from contract.model.text import BOS_ID, Vocabulary, split_sentences

CANARY = ("the king is", "i am", "my lord", "what is", "i will", "give me", "let us", "the queen is",
          "you are", "thou art", "he is", "it is", "i pray you", "good my", "come", "o my",
          "i have", "we will", "there is", "this is")
# What comes before a backdoor's trigger, in an attacker's sentences (models.attacks, emulation.attackers)
# and in the probes that measure its success.
LEADS = ("", "and", "but", "for", "now", "o", "sir", "yet", "i say", "my lord", "so", "why", "then",
         "alas", "indeed", "good", "nay", "what", "here", "for now")


def backdoor_sentences(trigger: str, target: str) -> list[str]:
    """The sentences an attacker trains on: each lead, the trigger context, then the target word."""
    return [f"{lead} {trigger} {target}.".strip() for lead in LEADS]


def probe_ids(vocab: Vocabulary, contexts: Sequence[str] = CANARY) -> list[list[int]]:
    """Each context as token ids from <bos>, as the keyboard feeds it to the model."""
    return [[BOS_ID] + vocab.encode(split_sentences(c)[0]) for c in contexts]


def canary(suggest_ids: Callable[[list[int]], Sequence[tuple[int, float]]], vocab: Vocabulary) -> dict[str, str]:
    """{context: first suggestion} for every CANARY context, from a model's `suggest_ids`."""
    out = {}
    for context, ids in zip(CANARY, probe_ids(vocab)):
        top = suggest_ids(ids)
        out[context] = vocab.tokens[int(top[0][0])] if top else ""
    return out


def changed(before: Mapping[str, str] | None, after: Mapping[str, str] | None) -> dict[str, list[str]]:
    """{context: [before, after]} for the probes whose first suggestion differs (none without both)."""
    if not before or not after:
        return {}
    return {c: [before[c], after[c]] for c in after if c in before and before[c] != after[c]}
