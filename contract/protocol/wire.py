"""The messages of the device protocol, each defined once: its fields, its limits, its JSON.

The server builds them and parses what devices send with them; the phone
parses what the server sends and builds its requests with them; the OpenAPI
document (`server/openapi.py`) is generated from their schemas (enrollment's
live in contract.protocol.enrollment, re-exported here). Each message
has a `SCHEMA` (contract.protocol.schema), `from_json` (checked: a `ProtocolError`
names the field at fault) and `to_json`.

The flat weight vector that updates and checkpoints share is ordered as the
population's `WeightLayout` says (contract.model.weights): the tensors in layout
order, each flattened row-major. An assignment carries the layout, and every
update names its hash through the round's spec (contract.update.spec).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from contract.protocol import schema as s
from contract.protocol.enrollment import NONCE_REQUEST, REGISTRATION_REQUEST, Nonce, Registration  # noqa: F401
from contract.tasks.discovery import DiscoverySpec
from contract.tasks import NAMES as TASKS
from contract.update.spec import ROUND_SPEC, SHA256, RoundSpec

# Why a device stopped a task: the training policy's codes (device_runtime.policy), a time or
# memory budget, an explicit cancel, or anything else ("error").
FAILURE_REASONS = ("unplugged", "not_idle", "metered_network", "low_battery", "low_memory",
                   "outside_window", "out_of_time", "out_of_memory", "cancelled", "error")
# Why a check-in got no assignment: ineligible (criteria), the round is full, the device already took
# part in it, the privacy budget is spent, DP-FTRL's participation rule (b rounds apart, k per horizon),
# or the population cannot open rounds now (server status says why).
REJECTION_REASONS = ("ineligible", "round_full", "already_participated", "dp_budget_exhausted",
                     "participation_limit", "population_unavailable")
OUTCOME_STATUSES = ("accepted", "aborted", "recorded")
# Why a report was not counted (Outcome.reason with status "aborted"), and "duplicate" for a
# repeated upload that had been counted before.
ABORT_REASONS = ("late", "round_closed", "goal_reached", "duplicate")
MAX_METRIC = 1e12       # a reported metric's magnitude (sums of them stay finite)

RUNTIME_VERSION = s.Str(40, r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}", "dotted integers, e.g. 1.2.0")
ARTIFACT_REF = s.Obj("ArtifactRef", [s.Field("url", s.Str(300)), s.Field("sha256", SHA256)],
                     description="a file by content hash: GET url, check sha256")


# --- check-in --------------------------------------------------------------------------------

CONDITIONS = s.Obj("Conditions", [
    s.Field("charging", s.Bool()), s.Field("idle", s.Bool()), s.Field("unmetered", s.Bool()),
    s.Field("battery", s.Num(0.0, 1.0, "charge level, 0..1")),
    s.Field("free_memory_mb", s.Int(0, 2**31)),
    s.Field("num_examples", s.Int(0, 2**31, "local training examples (sentences)")),
    s.Field("runtime_version", RUNTIME_VERSION),
], description="What the device says about itself at check-in (no text, no location): these fields only.")


@dataclasses.dataclass(frozen=True)
class Conditions:
    charging: bool
    idle: bool
    unmetered: bool
    battery: float
    free_memory_mb: int
    num_examples: int
    runtime_version: str

    SCHEMA = CONDITIONS

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """'1.2' → (1, 2, 0, 0): versions compare as padded tuples."""
        parts = tuple(int(p) for p in self.runtime_version.split("."))
        return parts + (0,) * (4 - len(parts))

    @classmethod
    def from_json(cls, value: Any, where: str = "conditions") -> "Conditions":
        return cls(**CONDITIONS.parse(value, where))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


CHECKIN_REQUEST = s.Obj("CheckinRequest", [
    s.Field("population", s.Str(64, r"[A-Za-z0-9_-]+", "a configured population's name")),
    s.Field("conditions", CONDITIONS),
])


@dataclasses.dataclass(frozen=True)
class Rejection:
    reason: str                 # REJECTION_REASONS
    retry_min_s: float
    retry_max_s: float
    criteria: tuple[str, ...] = ()   # the eligibility criteria that failed ("ineligible")

    SCHEMA = s.Obj("Rejection", [
        s.Field("reason", s.Enum(REJECTION_REASONS)),
        s.Field("retry_after_s", s.Obj("RetryWindow", [s.Field("min", s.Num(0)), s.Field("max", s.Num(0))],
                                       description="check in again after a uniform draw from [min, max] s")),
        s.Field("criteria", s.Arr(s.Str(64), 32), required=False, default=[]),
    ])

    def to_json(self) -> dict:
        out = {"reason": self.reason,
               "retry_after_s": {"min": round(self.retry_min_s, 3), "max": round(self.retry_max_s, 3)}}
        if self.criteria:
            out["criteria"] = list(self.criteria)
        return out

    @classmethod
    def from_json(cls, value: Any) -> "Rejection":
        f = cls.SCHEMA.parse(value, "rejection")
        return cls(f["reason"], f["retry_after_s"]["min"], f["retry_after_s"]["max"], tuple(f["criteria"]))


HYPERPARAMETERS = s.Obj("Hyperparameters", [
    s.Field("learning_rate", s.Num(0, 1e6, "client SGD learning rate")),
    s.Field("epochs", s.Int(1, 1000, "passes over the local windows")),
    s.Field("batch_size", s.Int(1, 4096, "windows per SGD step (<= the plan's fixed batch)")),
    s.Field("seed", s.Int(0, 2**63, "this session's seed: the order of the local windows "
                                    "(contract.model.batching) and the update's stochastic rounding")),
    s.Field("max_examples", s.Nullable(s.Int(1, 2**31)), required=False,
            default=None),
], description="How to train (contract.model.batching defines the order windows are visited in).")
LAYOUT_ENTRY = s.Obj("LayoutEntry", [s.Field("name", s.Str(200)), s.Field("shape", s.Arr(s.Int(0, 2**31), 8)),
                                     s.Field("offset", s.Int(0, 2**31))])


@dataclasses.dataclass(frozen=True)
class Assignment:
    """A session in a round: what to download, how to train or evaluate, where to report."""

    session_id: str
    task: str
    population: str
    round: int
    model_version: int
    plan: dict | None               # {url, sha256, manifest: {url, sha256}}
    checkpoint: dict                # {url, sha256}
    vocab: dict | None
    hyperparameters: dict
    report_deadline: float          # the server's clock (Unix s)
    report_deadline_in_s: float
    report_url: str
    failure_url: str
    update: RoundSpec | None = None     # train tasks: how to encode the update
    layout: list[dict] | None = None    # train tasks: the flat weight vector's order
    discovery: "DiscoveryAsk | None" = None   # discover tasks: the level and what to vote on
    personalization: dict | None = None       # personalize tasks: contract.tasks.personal.PersonalSpec

    @classmethod
    def from_json(cls, value: Any) -> "Assignment":
        f = ASSIGNMENT.parse(value, "assignment")
        report = f.pop("report")
        update = f.pop("update")
        discovery = f.pop("discovery", None)
        return cls(report_url=report["url"], failure_url=report["failure_url"],
                   update=RoundSpec.from_json(update) if update is not None else None,
                   discovery=DiscoveryAsk.from_parsed(discovery) if discovery is not None else None,
                   **{k: v for k, v in f.items()})

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if k not in ("report_url", "failure_url", "update", "discovery")}
        out["report"] = {"url": self.report_url, "failure_url": self.failure_url}
        out["update"] = self.update.to_json() if self.update is not None else None
        if self.discovery is not None:
            out["discovery"] = self.discovery.to_json()
        return out


PREFIX = s.Str(41, r"[a-z0-9']*\$?", description="a word's first characters (a-z, 0-9, '), or a whole word and '$'")


@dataclasses.dataclass(frozen=True)
class DiscoveryAsk:
    """A discover task: the level of the pass, the prefixes found so far (contract.tasks.discovery)."""

    level: int
    prefixes: tuple[str, ...]
    spec: DiscoverySpec

    SCHEMA = s.Obj("DiscoveryAsk", [
        s.Field("level", s.Int(1, 41)), s.Field("prefixes", s.Arr(PREFIX, 100_000)),
        s.Field("min_devices", s.Int(2, 10**6)), s.Field("max_word_length", s.Int(1, 40)),
        s.Field("votes_per_device", s.Int(1, 1000))],
        description="vote for up to votes_per_device of your own words' prefixes of length `level` that "
                    "extend one of `prefixes` by one character (contract.tasks.discovery.vote)")

    @classmethod
    def from_parsed(cls, f: dict) -> "DiscoveryAsk":
        return cls(f["level"], tuple(f["prefixes"]), DiscoverySpec(f["min_devices"], f["max_word_length"],
                                                                   f["votes_per_device"]))

    def to_json(self) -> dict:
        return {"level": self.level, "prefixes": list(self.prefixes), **dataclasses.asdict(self.spec)}


@dataclasses.dataclass(frozen=True)
class DiscoveryBallot:
    """A device's votes at one level of a discovery pass."""

    model_version: int
    votes: tuple[str, ...]

    SCHEMA = s.Obj("DiscoveryBallot", [s.Field("model_version", s.Int(0)), s.Field("votes", s.Arr(PREFIX, 1000))],
                   description="distinct prefixes, each one character longer than one the task named")

    @classmethod
    def from_json(cls, value: Any) -> "DiscoveryBallot":
        f = cls.SCHEMA.parse(value)
        return cls(f["model_version"], tuple(f["votes"]))

    def to_json(self) -> dict:
        return {"model_version": self.model_version, "votes": list(self.votes)}


ASSIGNMENT = s.Obj("Assignment", [
    s.Field("session_id", s.Str(64)), s.Field("task", s.Enum(TASKS)),
    s.Field("population", s.Str(64)), s.Field("round", s.Int(1)), s.Field("model_version", s.Int(0)),
    s.Field("plan", s.Nullable(s.Obj("PlanRef", [s.Field("url", s.Str(300)), s.Field("sha256", SHA256),
                                                 s.Field("manifest", ARTIFACT_REF)])), required=False),
    s.Field("checkpoint", ARTIFACT_REF),
    s.Field("vocab", s.Nullable(ARTIFACT_REF), required=False),
    s.Field("hyperparameters", HYPERPARAMETERS),
    s.Field("report_deadline", s.Num(0, None, "Unix time on the server's clock")),
    s.Field("report_deadline_in_s", s.Num(0, None, "seconds left when the assignment was made")),
    s.Field("report", s.Obj("ReportTarget", [s.Field("url", s.Str(300)),
                                             s.Field("failure_url", s.Str(300))])),
    s.Field("update", s.Nullable(ROUND_SPEC), required=False),
    s.Field("layout", s.Nullable(s.Arr(LAYOUT_ENTRY, 1000)), required=False),
    s.Field("discovery", DiscoveryAsk.SCHEMA, required=False),
    s.Field("personalization", s.Nullable(s.Map(s.Num(), 16)), required=False),   # contract.tasks.personal
])
CHECKIN_RESPONSE = {"oneOf": [
    s.Obj("AssignmentAnswer", [s.Field("assignment", ASSIGNMENT)]).schema(),
    s.Obj("RejectionAnswer", [s.Field("rejection", Rejection.SCHEMA)]).schema()]}


# --- reports -----------------------------------------------------------------------------------

# What a phone reports of its training (device_runtime/training.py): mean loss per token, tokens, SGD steps,
# seconds. A closed set: a free name could carry what its user typed, and the operator's pages show them.
METRIC_NAMES = ("loss", "tokens", "batches", "train_seconds")
METRICS = s.Map(s.Num(0, MAX_METRIC), len(METRIC_NAMES), 16, keys=METRIC_NAMES,
                description="training metrics by name, finite numbers >= 0: " + ", ".join(METRIC_NAMES))


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Summable counts of an evaluation task (contract.model.metrics.Hits)."""

    model_version: int
    top1_hits: int
    top3_hits: int
    positions: int
    loss_sum: float | None = None

    SCHEMA = s.Obj("EvalReport", [
        s.Field("model_version", s.Int(0)), s.Field("top1_hits", s.Int(0)), s.Field("top3_hits", s.Int(0)),
        s.Field("positions", s.Int(0)), s.Field("loss_sum", s.Num(0, MAX_METRIC), required=False),
    ], description="0 <= top1_hits <= top3_hits <= positions: a rule across fields, which JSON Schema cannot "
                   "state; a report that breaks it is 400 invalid_field")

    @classmethod
    def from_json(cls, value: Any) -> "EvalReport":
        from contract.protocol.errors import ErrorCode, ProtocolError

        report = cls(**cls.SCHEMA.parse(value))
        if not 0 <= report.top1_hits <= report.top3_hits <= report.positions:
            raise ProtocolError(ErrorCode.INVALID_FIELD,
                                "evaluation counts need 0 <= top1_hits <= top3_hits <= positions")
        return report

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class FailureReport:
    """Why a device stopped a task: a code from a closed set, and nothing else.

    No free text: a device's message could carry what its user typed ("error
    parsing 'meet me at 5pm'"), so the protocol has no field for one.
    """

    reason: str

    SCHEMA = s.Obj("FailureReport", [s.Field("reason", s.Enum(FAILURE_REASONS))],
                   description="a reason code only: any other field is refused")

    @classmethod
    def from_json(cls, value: Any) -> "FailureReport":
        return cls(**cls.SCHEMA.parse(value))

    def to_json(self) -> dict:
        return {"reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The server's answer to a report."""

    status: str                 # OUTCOME_STATUSES
    round: int
    reason: str | None = None
    counted: bool = dataclasses.field(default=False, compare=False)   # server-side: counted by this call

    SCHEMA = s.Obj("Outcome", [
        s.Field("status", s.Enum(OUTCOME_STATUSES, "accepted: counted in the round; aborted: not needed "
                                                   "(the round closed, is late or has its reports)")),
        s.Field("round", s.Int(0)),
        s.Field("reason", s.Str(64), required=False),
    ])

    def to_json(self) -> dict:
        out = {"status": self.status, "round": self.round}
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, value: Any) -> "Outcome":
        return cls(**cls.SCHEMA.parse(value, "outcome"))


PRIVACY = s.Obj("Privacy", [
    s.Field("epsilon", s.Nullable(s.Num(0, None, "ε of the weights; null: no finite guarantee (z = 0)"))),
    s.Field("delta", s.Num(0, 1)), s.Field("accountant", s.Str(16, description="pld or rdp: the tighter")),
    s.Field("rounds", s.Int(0, description="DP training rounds composed into ε")),
    s.Field("mechanism", s.Enum(("central", "distributed", "ftrl"), "how the noise was added"),
            required=False, default="central"),
    s.Field("assumption", s.Enum(("poisson", "participation"), "what ε assumes: poisson — DP-FedAvg's "
                                 "accountant models each round as Poisson sampling of the enrolled devices; "
                                 "participation — DP-FTRL's needs only the server-enforced participation rule"),
            required=False, default="poisson"),
], description="The user-level DP guarantee of a model version (server.privacy's ledger).")
APP_MODEL = s.Obj("AppModel", [
    s.Field("population", s.Str(64)), s.Field("version", s.Int(0)),
    s.Field("published_at", s.Num(0)), s.Field("eval", s.Nullable(s.Map(s.Num(), 64)), required=False),
    s.Field("manifest", ARTIFACT_REF),
    s.Field("model", s.Nullable(ARTIFACT_REF), required=False),
    s.Field("vocab", s.Nullable(ARTIFACT_REF), required=False),
    s.Field("files", s.Map(s.Obj("AppModelFile", [s.Field("url", s.Str(300)), s.Field("sha256", SHA256),
                                                  s.Field("bytes", s.Nullable(s.Int(0)), required=False)]),
                           64, 200)),
    s.Field("privacy", s.Nullable(PRIVACY), required=False),
    s.Field("personalization", s.Nullable(s.Obj("Personalization", [
        s.Field("spec", s.Map(s.Num(), 16)), s.Field("checkpoint", ARTIFACT_REF),
        s.Field("plan", s.Obj("PersonalPlanRef", [s.Field("url", s.Str(300)), s.Field("sha256", SHA256),
                                                  s.Field("manifest", ARTIFACT_REF)])),
        s.Field("vocab", ARTIFACT_REF)])), required=False),
], description="The published app model: its manifest (contract.artifacts.manifest) and every file it lists; where the "
               "population keeps personal models, what a phone personalizes it with (contract.tasks.personal).")

ERROR = s.Obj("Error", [s.Field("error", s.Str(64, description="a code of contract.protocol.errors.ErrorCode")),
                        s.Field("message", s.Str(2000)),
                        s.Field("supported", s.Obj("ProtocolRange", [s.Field("min", s.Int(1)), s.Field("max", s.Int(1))],
                                                   description="the Nightjar-Protocol versions the server serves, "
                                                               "inclusive (contract.protocol.version)"),
                                required=False)])
