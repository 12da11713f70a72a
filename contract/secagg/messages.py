"""The messages of secure aggregation's phases (contract.secagg.masking), as the device and the server parse them.

Keys, commitments, ciphertexts and shares travel as fixed-length base64url
strings (`schema.B64`); devices are named by their number in the round's
neighbour graph. A device follows its session's phase with
`GET /v1/sessions/<id>/secagg` (`SecAggStatus`) and answers it with
`SecAggKeys`, `SecAggShares` or `SecAggReveal`; its masked update goes to the
session's usual upload (contract.update.masked.MaskedWireFormat).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from contract.protocol import schema as s
from contract.secagg import shamir
from contract.secagg.masking import CIPHERTEXT_BYTES, KEY, KEY_BYTES, SELF, Advertisement, Neighbour

PHASES = ("keys", "shares", "masking", "unmasking", "done", "failed", "excluded")
MAX_NEIGHBOURS = 1000
NODE = s.Int(1, 10**6, "a device's number in the round's neighbour graph")
KEY_B64 = s.B64(KEY_BYTES, "an X25519 public key (raw 32 bytes)")


@dataclasses.dataclass(frozen=True)
class SecAggKeys:
    """Advertise keys: the two public keys and the commitment to the self-mask seed."""

    advertisement: Advertisement

    SCHEMA = s.Obj("SecAggKeys", [
        s.Field("enc_pk", KEY_B64), s.Field("mask_pk", KEY_B64),
        s.Field("commitment", s.B64(32, "SHA-256 of the self-mask seed, bound to the round"))],
        description="secure aggregation, phase keys: what the device's neighbours will need")

    @classmethod
    def from_json(cls, value: Any) -> "SecAggKeys":
        f = cls.SCHEMA.parse(value)
        return cls(Advertisement(f["enc_pk"], f["mask_pk"], f["commitment"]))

    def to_json(self) -> dict:
        a = self.advertisement
        return {"enc_pk": s.B64.encode(a.enc_pk), "mask_pk": s.B64.encode(a.mask_pk),
                "commitment": s.B64.encode(a.commitment)}


CIPHERTEXT = s.B64(CIPHERTEXT_BYTES, "nonce (12 bytes) ‖ AES-256-GCM ciphertext of sender (4, big-endian) ‖ "
                   "receiver (4) ‖ self-seed share (66) ‖ masking-key share (66) ‖ tag (16): 168 bytes "
                   "(contract.secagg.primitives; PROTOCOL.md, Secure aggregation)")
SHARE_ITEM = s.Obj("SecAggShare", [s.Field("to", NODE), s.Field("ciphertext", CIPHERTEXT)])


@dataclasses.dataclass(frozen=True)
class SecAggShares:
    """Share keys: one ciphertext for each neighbour, readable only by it."""

    shares: dict[int, bytes]

    SCHEMA = s.Obj("SecAggShares", [s.Field("shares", s.Arr(SHARE_ITEM, MAX_NEIGHBOURS))],
                   description="secure aggregation, phase shares: exactly one per neighbour")

    @classmethod
    def from_json(cls, value: Any) -> "SecAggShares":
        items = cls.SCHEMA.parse(value)["shares"]
        return cls({i["to"]: i["ciphertext"] for i in items})

    def to_json(self) -> dict:
        return {"shares": [{"to": to, "ciphertext": s.B64.encode(c)} for to, c in sorted(self.shares.items())]}


REVEAL_ITEM = s.Obj("SecAggRevealedShare", [
    s.Field("owner", NODE), s.Field("kind", s.Enum((SELF, KEY))),
    s.Field("share", s.B64(shamir.SHARE_BYTES, "the Shamir share (big-endian field element)"))])


@dataclasses.dataclass(frozen=True)
class SecAggReveal:
    """Unmask: the shares the server asked for, one kind per owner."""

    shares: dict[int, tuple[str, bytes]]

    SCHEMA = s.Obj("SecAggReveal", [s.Field("shares", s.Arr(REVEAL_ITEM, MAX_NEIGHBOURS))],
                   description="secure aggregation, phase unmasking: the self-mask seed share of each "
                               "surviving neighbour and the masking-key share of each dropped one")

    @classmethod
    def from_json(cls, value: Any) -> "SecAggReveal":
        items = cls.SCHEMA.parse(value)["shares"]
        return cls({i["owner"]: (i["kind"], i["share"]) for i in items})

    def to_json(self) -> dict:
        return {"shares": [{"owner": o, "kind": k, "share": s.B64.encode(v)}
                           for o, (k, v) in sorted(self.shares.items())]}


def largest_body(message: type, items: int) -> int:
    """Bytes of the largest body of `items` entries a device may send as `message` (SecAggShares or
    SecAggReveal): every node number at its largest, written as json.dumps writes it by default
    (", " and ": ", ASCII), as `requests` sends it. The server's JSON body cap must hold it for the
    round's neighbour count (server.config_check), and the OpenAPI document bounds the entries by it."""
    node = NODE.hi
    if message is SecAggShares:
        body = SecAggShares({node + i: bytes(CIPHERTEXT_BYTES) for i in range(items)}).to_json()
    else:
        kind = max((SELF, KEY), key=len)
        body = SecAggReveal({node + i: (kind, bytes(shamir.SHARE_BYTES)) for i in range(items)}).to_json()
    for entry in body["shares"]:       # every entry names the largest node (distinct keys were only for the dict)
        entry["to" if message is SecAggShares else "owner"] = node
    return len(json.dumps(body))


def items_within(message: type, nbytes: int) -> int:
    """The most entries (at most MAX_NEIGHBOURS) whose largest `message` body fits in `nbytes`."""
    first, step = largest_body(message, 1), largest_body(message, 2) - largest_body(message, 1)
    return max(0, min(MAX_NEIGHBOURS, (nbytes - first) // step + 1))


NEIGHBOUR = s.Obj("SecAggNeighbour", [s.Field("node", NODE), s.Field("enc_pk", KEY_B64),
                                      s.Field("mask_pk", KEY_B64)])
INBOX_ITEM = s.Obj("SecAggInboxItem", [s.Field("from", NODE), s.Field("ciphertext", CIPHERTEXT)])
NODES = s.Arr(NODE, MAX_NEIGHBOURS)


@dataclasses.dataclass(frozen=True)
class SecAggStatus:
    """Where a session stands in its round's secure aggregation, and what the phase needs from it."""

    phase: str
    wait_s: float | None = None               # come back after this long (nothing to do yet)
    done: bool = False                        # this session has answered the phase
    node: int | None = None                   # from phase shares on
    threshold: int | None = None
    neighbours: tuple[Neighbour, ...] = ()    # phase shares
    inbox: dict[int, bytes] = dataclasses.field(default_factory=dict)   # phase masking
    survivors: tuple[int, ...] = ()           # phase unmasking: reveal their self-seed shares
    dropped: tuple[int, ...] = ()             # ... and these devices' masking-key shares

    SCHEMA = s.Obj("SecAggStatus", [
        s.Field("phase", s.Enum(PHASES, "keys → shares → masking → unmasking → done (or failed; "
                                        "excluded: the session left the masking set)")),
        s.Field("wait_s", s.Nullable(s.Num(0)), required=False), s.Field("done", s.Bool()),
        s.Field("node", s.Nullable(NODE), required=False),
        s.Field("threshold", s.Nullable(s.Int(1, MAX_NEIGHBOURS)), required=False),
        s.Field("neighbours", s.Arr(NEIGHBOUR, MAX_NEIGHBOURS)),
        s.Field("inbox", s.Arr(INBOX_ITEM, MAX_NEIGHBOURS)),
        s.Field("survivors", NODES), s.Field("dropped", NODES)],
        description="secure aggregation: this session's phase and what it needs")

    @classmethod
    def from_json(cls, value: Any) -> "SecAggStatus":
        f = cls.SCHEMA.parse(value, "secagg")
        return cls(f["phase"], f["wait_s"], f["done"], f["node"], f["threshold"],
                   tuple(Neighbour(n["node"], n["enc_pk"], n["mask_pk"]) for n in f["neighbours"]),
                   {i["from"]: i["ciphertext"] for i in f["inbox"]}, tuple(f["survivors"]), tuple(f["dropped"]))

    def to_json(self) -> dict:
        return {"phase": self.phase, "wait_s": self.wait_s, "done": self.done, "node": self.node,
                "threshold": self.threshold,
                "neighbours": [{"node": n.node, "enc_pk": s.B64.encode(n.enc_pk), "mask_pk": s.B64.encode(n.mask_pk)}
                               for n in self.neighbours],
                "inbox": [{"from": o, "ciphertext": s.B64.encode(c)} for o, c in sorted(self.inbox.items())],
                "survivors": list(self.survivors), "dropped": list(self.dropped)}
