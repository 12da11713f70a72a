"""Dropout masks drawn from a training session's seed: the phone's and the simulation's, bit for bit. TF-free.

The CIFG is regularized with dropout where Zaremba et al. (2014) put it:
on the non-recurrent connections only — the embedding output that feeds
the cell (`"embedding"`) and the projected cell output that feeds the tied
output layer (`"projection"`); the recurrent state is never dropped.

A LiteRT plan has no random ops that a phone could seed (and no Flex ops),
so a mask is an *input* of the plan's `train` signature, drawn here on the
phone. The TFF simulation draws the very same masks from the same seed
(models.simulate puts them in the client's dataset), which is what keeps
one round on phones equal to the same round in simulation with dropout on.

The stream is numpy's Philox keyed by (a tag, the session's seed, the step):
deterministic, cheap and independent between steps, which is all dropout
needs — it is not a security secret (the session seed already fixes the
client's batch order, contract.model.batching).
"""
from __future__ import annotations

import dataclasses

import numpy as np

PLACEMENTS = ("embedding", "projection")   # embedding output → cell; projected cell output → output layer
_TAG = 0x64726F70                           # "drop": keeps this stream apart from the batch order's


@dataclasses.dataclass(frozen=True)
class Dropout:
    """A training plan's dropout option (recorded in its manifest)."""

    rate: float = 0.3                        # probability that a unit is dropped (kept ones scale by 1/(1-rate))
    placement: tuple[str, ...] = PLACEMENTS  # where masks apply, a subset of PLACEMENTS (in that order)

    def validate(self, what: str = "dropout") -> "Dropout":
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"{what}: rate must be in (0, 1), got {self.rate}")
        if not self.placement or len(set(self.placement)) != len(self.placement) \
                or any(p not in PLACEMENTS for p in self.placement):
            raise ValueError(f"{what}: placement must be distinct names among {', '.join(PLACEMENTS)}; "
                             f"got {list(self.placement)}")
        if tuple(p for p in PLACEMENTS if p in self.placement) != tuple(self.placement):
            raise ValueError(f"{what}: list the placement in the order {', '.join(PLACEMENTS)}")
        return self

    @property
    def scale(self) -> float:
        """What a kept unit is multiplied by (inverted dropout: the expected activation is unchanged)."""
        return 1.0 / (1.0 - self.rate)

    def to_json(self) -> dict:
        return {"rate": self.rate, "placement": list(self.placement)}

    @classmethod
    def from_json(cls, data: dict | None) -> "Dropout | None":
        """The manifest's `dropout` object, or None (no dropout); ValueError on anything else."""
        if data is None:
            return None
        if not isinstance(data, dict) or set(data) != {"rate", "placement"}:
            raise ValueError("dropout must be {rate, placement}")
        if not isinstance(data["rate"], (int, float)) or isinstance(data["rate"], bool) \
                or not isinstance(data["placement"], list):
            raise ValueError("dropout: rate must be a number and placement a list")
        return cls(float(data["rate"]), tuple(str(p) for p in data["placement"])).validate()


def parse(rate: float, placement: str = ",".join(PLACEMENTS)) -> Dropout | None:
    """A command line's `--dropout RATE [--dropout-placement a,b]`: None for a rate of 0."""
    if rate == 0:
        return None
    return Dropout(rate, tuple(p for p in placement.split(",") if p)).validate("--dropout")


def keep_masks(dropout: Dropout, seed: int, step: int, rows: int, seq_len: int, dim: int) -> list[np.ndarray]:
    """The 0/1 keep masks float32 [rows, seq_len, dim] of one SGD step, one per placement (in order).

    `seed` is the session's (the one that orders the client's batches), `step` the batch's index in
    contract.model.batching.client_batches' list (counting through every epoch), `rows` the batch's
    real rows: a plan pads a short batch itself, and the padding rows carry no loss.
    """
    if seed < 0 or step < 0 or rows < 0:
        raise ValueError("seed, step and rows must be >= 0")
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([_TAG, int(seed), int(step)])))
    shape = (rows, seq_len, dim)
    return [(rng.random(shape, dtype=np.float32) >= np.float32(dropout.rate)).astype(np.float32)
            for _ in dropout.placement]


def session_masks(dropout: Dropout, seed: int, batch_rows: list[int], seq_len: int,
                  dim: int) -> list[np.ndarray]:
    """Every step's masks of a session whose batches have `batch_rows` rows, stacked along the rows
    (one array [sum(batch_rows), seq_len, dim] per placement, uint8): what a simulated client trains with."""
    per_step = [keep_masks(dropout, seed, step, rows, seq_len, dim) for step, rows in enumerate(batch_rows)]
    return [np.concatenate([m[i] for m in per_step]).astype(np.uint8) if per_step
            else np.zeros((0, seq_len, dim), np.uint8) for i in range(len(dropout.placement))]
