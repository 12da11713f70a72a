"""Server configuration: a small TOML (or JSON) file read into dataclasses with defaults.

Every knob has an explicit default here, chosen from the production systems
Nightjar imitates (see /work/shared/REFERENCES.md): over-selection 1.3 (Bonawitz
et al. 2019: 6-10% of devices drop out), devices idle + charging + unmetered
with >= 2 GB of memory and server momentum 0.9 at learning rate 1.0 (Gboard,
Hard et al. 2018), an ineligible device retrying after 15 min +- 20%
(federated-compute). Relative paths in a file are relative to that file.

    database = "state/nightjar.db"
    bind = "127.0.0.1:8080"

    [populations.en-keyboard]
    goal = 100
    server_optimizer = "sgdm"

    [populations.en-keyboard.eligibility]
    min_battery = 0.3

    [populations.en-keyboard.update]      # contract.update.spec: 8-bit, clipped, capped by default
    bits = 8
    clip_norm = 5.0
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contract.dp.noise import DPSpec
from server.config_check import ConfigError, validated as _validated
from contract.tasks.personal import PersonalSpec
from contract.update.spec import UpdateSpec



@dataclasses.dataclass(frozen=True)
class EligibilityConfig:
    """Which check-ins may take part (see server.policy)."""

    require_charging: bool = True
    require_idle: bool = True
    require_unmetered: bool = True
    min_battery: float = 0.0            # fraction 0..1
    min_free_memory_mb: int = 2048      # Gboard: >= 2 GB
    min_examples: int = 1
    min_separation_s: float = 3600.0    # between two accepted reports of one device
    min_runtime_version: str | None = None   # inclusive, dotted integers ("1.2.0")
    max_runtime_version: str | None = None   # inclusive


@dataclasses.dataclass(frozen=True)
class EnrollmentConfig:
    """Who may become a device of the population (see server.enrollment).

    A device enrolls with the population's app credential and an attestation
    statement bound to a fresh server nonce, signed by the attestation issuer.
    When the config names neither, `python -m server init` makes a credential
    and a development issuer key pair (a stand-in for Play Integrity) in the
    private state directory and prints where they are.
    """

    app_credential_sha256: str | None = None   # sha256 hex of the credential the app ships with
    verifier: str = "ed25519"                  # how attestation statements are checked
    issuer_public_key: str | None = None       # Ed25519, 32 raw bytes base64url: the issuer's key
    app_id: str | None = None                  # the statement must name this app (None: any)
    nonce_ttl_s: float = 300.0                 # a nonce is good for this long, and once


@dataclasses.dataclass(frozen=True)
class RateLimits:
    """Token buckets (burst, per seconds) per action; a burst of 0 turns one off (server.ratelimit).

    An honest phone registers once, asks for a nonce once, checks in a few
    times an hour overnight and uploads and downloads a handful of times: these
    allow several times that. Addresses are allowed more than devices (phones
    share addresses behind carrier NAT).
    """

    nonce_per_address: tuple[float, float] = (60.0, 3600.0)
    register_per_address: tuple[float, float] = (60.0, 3600.0)
    checkin_per_device: tuple[float, float] = (120.0, 3600.0)
    checkin_per_address: tuple[float, float] = (20_000.0, 3600.0)
    upload_per_device: tuple[float, float] = (30.0, 3600.0)
    upload_per_address: tuple[float, float] = (10_000.0, 3600.0)
    artifact_per_device: tuple[float, float] = (300.0, 3600.0)
    artifact_per_address: tuple[float, float] = (20_000.0, 3600.0)
    secagg_per_device: tuple[float, float] = (2_000.0, 3600.0)      # secure aggregation's polls and answers
    secagg_per_address: tuple[float, float] = (200_000.0, 3600.0)
    login_per_address: tuple[float, float] = (30.0, 600.0)          # dashboard sign-ins (guessing the token)


@dataclasses.dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation's phases ([populations.<name>.secagg]; server.secagg runs them)."""

    neighbours: int | None = None       # k; default contract.secagg.masking.default_degree(n, max_dropout)
    max_dropout: float = 0.3            # the default k survives this fraction leaving after the graph
    keys_window_s: float = 30.0         # from the selection's close: the last devices' keys
    shares_window_s: float = 60.0       # from the graph: devices exchange their shares
    unmask_window_s: float = 120.0      # from the reports' close: survivors reveal shares


@dataclasses.dataclass(frozen=True)
class DiscoveryConfig:
    """Federated discovery of new words ([populations.<name>.discovery]; server.discovery runs it)."""

    every: int = 0                      # a discovery pass after every N training rounds (0: never)
    goal: int = 0                       # reports a discover round wants (0: the population's goal)
    min_devices: int = 10               # no word typed by fewer devices is ever revealed
    max_word_length: int = 12
    votes_per_device: int = 100         # 1: TrieHH's (ε, δ) analysis applies (contract.tasks.discovery)

    @property
    def spec(self):
        from contract.tasks.discovery import DiscoverySpec

        return DiscoverySpec(self.min_devices, self.max_word_length, self.votes_per_device)


@dataclasses.dataclass(frozen=True)
class DPBudget:
    """The most a population may spend ([populations.<name>.dp_budget]; server.privacy keeps the ledger)."""

    epsilon: float
    delta: float


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    """How the rounds of one population run. Fixed into each round when it opens."""

    goal: int = 100                     # reports a round wants
    over_selection: float = 1.3         # select up to ceil(goal * over_selection)
    min_selected_fraction: float = 0.8  # a round starts reporting only with this x goal selected
    min_report_fraction: float = 0.8    # ... and completes only with this x goal reports
    selection_window_s: float = 120.0
    reporting_window_s: float = 600.0   # after the selection window: the report deadline
    client_lr: float = 0.5
    client_epochs: int = 1
    client_batch_size: int = 16         # must be the training plan's fixed batch size
    client_max_examples: int | None = None   # windows per epoch per device (contract.model.batching cap)
    server_optimizer: str = "sgdm"
    server_lr: float = 1.0
    server_momentum: float = 0.9        # sgdm only
    min_round_size: int = 5             # no version (nor evaluation) from fewer reports: the minimum cohort
    eval_every: int = 10                # an evaluation round after every N training rounds (0: never)
    publish_every: int = 10             # publish at most every K versions (0: never)
    ineligible_retry_s: tuple[float, float] = (720.0, 1080.0)   # 15 min +- 20%
    max_retry_s: float = 6 * 3600.0     # pace steering never spreads further than this
    seed: int = 0
    eligibility: EligibilityConfig = EligibilityConfig()
    enrollment: EnrollmentConfig = EnrollmentConfig()
    # How devices encode updates ([populations.<name>.update]; contract.update.spec). When
    # max_weight is not set, it is the default per epoch x client_epochs.
    update: UpdateSpec = UpdateSpec()
    # The server learns only the sum of a round's updates (server.secagg); implies the rotation.
    secure_aggregation: bool = False
    secagg: SecAggConfig = SecAggConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    # User-level DP-FedAvg with adaptive clipping ([populations.<name>.dp]; contract.dp.noise, server.privacy):
    # the update's clip_norm is then the adaptive clip, and the mean is unweighted over `goal`.
    dp: DPSpec | None = None
    dp_budget: DPBudget | None = None   # refuse training rounds beyond it; None: spend without limit
    # Personal models on the phones ([populations.<name>.personalization]; contract.tasks.personal): published
    # versions then come with their float weights and the training plan, and every
    # `personal_eval_every` training rounds a round evaluates personalization on the devices.
    personalization: PersonalSpec | None = None
    personal_eval_every: int = 0
    # Where the population's users live (IANA names, e.g. "Europe/Berlin"): the dashboard shows
    # participation by local hour in each. The server never learns a device's own zone.
    time_zones: tuple[str, ...] = ("UTC",)

    @property
    def max_selected(self) -> int:
        return max(1, math.ceil(self.goal * self.over_selection - 1e-9))

    @property
    def min_selected(self) -> int:
        return max(1, math.ceil(self.goal * self.min_selected_fraction - 1e-9))

    @property
    def min_reports(self) -> int:
        """A round completes with this many reports: the fraction of the goal, and the minimum cohort."""
        return max(1, self.min_round_size, math.ceil(self.goal * self.min_report_fraction - 1e-9))


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    # A SQLite file (the embedded default), or "postgresql://user@host:port/db" for several replicas.
    database: Path | str = Path("nightjar-state/nightjar.db")
    artifact_dir: Path = Path("nightjar-state/artifacts")   # public, content-addressed
    state_dir: Path = Path("nightjar-state/private")        # partial sums, optimizer states
    bind: str = "127.0.0.1:8080"
    workers: int = 2                           # gunicorn processes (state is all in SQLite/files)
    threads: int = 8
    max_upload_bytes: int = 32 * 1024 * 1024   # an update body (Gboard's is 5.7 MB)
    max_json_bytes: int = 64 * 1024            # any other request body
    aggregation_shards: int = 4                # concurrent writers of a round's running sum (per replica)
    replica: int = 0                           # this replica's index when several share one PostgreSQL
    fsync: bool = False     # True: survive power loss too (fsync files, SQLite synchronous=FULL)
    tick_interval_s: float = 1.0               # background round ticker (0: requests only)
    publish_timeout_s: float = 1800.0          # a publish job older than this is retried
    operator_token: str | None = None          # operator endpoints need it as Bearer; default: the file's
    operator_token_file: Path | None = None    # default: <state_dir>/operator_token (made by `server init`)
    trust_forwarded_for: bool = False          # the client's address is X-Forwarded-For's last hop (a proxy)
    log_level: str = "info"                    # JSON log lines (server.logs): debug, info, warning, error
    rate_limits: RateLimits = RateLimits()
    exporter: tuple[str, ...] | None = None    # command prefix; default: this python -m tflite_export
    # Simulated time (emulated fleets): now = clock_start + (time.time() - clock_epoch) * clock_speed.
    clock_speed: float = 1.0
    clock_start: float | None = None
    clock_epoch: float | None = None
    populations: Mapping[str, PopulationConfig] = dataclasses.field(default_factory=dict)

    @property
    def operator_token_path(self) -> Path:
        return self.operator_token_file or self.state_dir / "operator_token"

    def enrollment_path(self, population: str) -> Path:
        """Where `server init` keeps a population's app credential and development issuer keys."""
        return self.state_dir / f"enrollment-{population}.json"

    def make_clock(self):
        from contract.clock import ScaledClock, SystemClock

        if self.clock_speed == 1.0 and self.clock_start is None:
            return SystemClock()
        import time
        epoch = time.time() if self.clock_epoch is None else self.clock_epoch
        start = epoch if self.clock_start is None else self.clock_start
        return ScaledClock(start, self.clock_speed, epoch)

    def population(self, name: str) -> PopulationConfig:
        return self.populations[name]


def load_config(source: str | Path | Mapping[str, Any] | ServerConfig | None = None) -> ServerConfig:
    """A `ServerConfig` from a file path, a mapping (tests), an existing config or defaults."""
    if source is None:
        return _validated(ServerConfig())
    if isinstance(source, ServerConfig):
        return _validated(source)
    if isinstance(source, Mapping):
        return _validated(_from_mapping(source, base=Path.cwd()))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--config: no file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"{path}: not valid {kind} ({e})") from None
    return _validated(_from_mapping(data, base=path.resolve().parent))


def _build(cls, data: Mapping[str, Any], where: str, convert=None):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = convert(key, value) if convert else value
    return cls(**kwargs)


# The population's sub-tables and the dataclass each becomes ([populations.<name>.<key>]).
_TABLES = {"eligibility": EligibilityConfig, "update": UpdateSpec, "enrollment": EnrollmentConfig,
           "secagg": SecAggConfig, "discovery": DiscoveryConfig, "dp": DPSpec, "dp_budget": DPBudget,
           "personalization": PersonalSpec}


def _population(name: str, data: Mapping[str, Any]) -> PopulationConfig:
    def convert(key, value):
        cls = _TABLES.get(key)
        if cls is not None:
            return value if isinstance(value, cls) or value is None else _build(
                cls, value, f"populations.{name}.{key}")
        if key == "ineligible_retry_s":
            return tuple(float(v) for v in value)
        if key == "time_zones":
            return (value,) if isinstance(value, str) else tuple(value)
        return value

    population = _build(PopulationConfig, data, f"populations.{name}", convert)
    if population.secure_aggregation:
        rotation = population.update.rotation or "rotation" not in (data.get("update") or {})
        population = dataclasses.replace(population, update=dataclasses.replace(
            population.update, secure_aggregation=True, rotation=rotation))
    update = data.get("update")
    if population.dp is not None and not isinstance(update, UpdateSpec) and "weighting" not in (update or {}):
        # DP-FedAvg's mean is unweighted: every device's clipped update counts the same
        population = dataclasses.replace(population, update=dataclasses.replace(population.update,
                                                                                 weighting="uniform"))
    if not isinstance(update, UpdateSpec) and "max_weight" not in (update or {}):
        epochs = population.client_epochs if isinstance(population.client_epochs, int) else 1
        population = dataclasses.replace(population, update=population.update.scaled_to_epochs(epochs))
    return population


PATH_KEYS = ("database", "artifact_dir", "state_dir", "operator_token_file")


def _from_mapping(data: Mapping[str, Any], base: Path) -> ServerConfig:
    def convert(key, value):
        if key == "populations":
            return {str(n): p if isinstance(p, PopulationConfig) else _population(str(n), p)
                    for n, p in value.items()}
        if key == "exporter":
            return tuple(value) if value else None
        if key == "rate_limits":
            return value if isinstance(value, RateLimits) else _build(
                RateLimits, value, "rate_limits", lambda k, v: tuple(float(x) for x in v))
        return value

    config = _build(ServerConfig, data, "config", convert)
    from server.store import is_postgres_url
    return dataclasses.replace(config, **{k: base / Path(getattr(config, k)) for k in PATH_KEYS
                                          if getattr(config, k) is not None
                                          and not (k == "database" and is_postgres_url(config.database))})
