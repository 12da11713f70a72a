"""Checking a server configuration when it is loaded: every key against its bounds, every combination.

A value that cannot work is refused with a `ConfigError` naming the key
(`populations.<name>.<key>`), before a server starts or a round opens.
Kept apart from the dataclasses in server.config, which it checks by their
fields.
"""
from __future__ import annotations

import dataclasses

from contract.optimizers import SERVER_OPTIMIZERS

VERIFIERS = ("ed25519",)


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the key."""


def _check_dp(p, where: str, check) -> None:
    if p.dp is None:
        check(p.dp_budget is None, f"{where}.dp_budget needs a [{where}.dp] setting to spend it")
        return
    try:
        p.dp.validate(f"{where}.dp")
        p.dp.split(p.goal)
    except ValueError as e:
        raise ConfigError(f"{where}.dp: {e}") from None
    check(p.update.weighting == "uniform", f"{where}.update.weighting must be 'uniform' under DP "
          "(DP-FedAvg's mean is unweighted over the expected reports)")
    check(p.dp.mechanism != "distributed" or p.update.secure_aggregation,
          f"{where}.dp.mechanism = 'distributed' adds the noise on the devices under secure aggregation: "
          "set secure_aggregation = true, or use 'central'")
    check(not p.update.zeroing, f"{where}.update.zeroing draws its threshold from other devices' norms, which "
          "DP's accounting does not cover (DP's adaptive clip already bounds every update): set it to 0")
    b = p.dp_budget
    check(b is None or (isinstance(b.epsilon, (int, float)) and b.epsilon > 0 and isinstance(b.delta, (int, float))
                        and 0 < b.delta < 1), f"{where}.dp_budget must be {{epsilon > 0, 0 < delta < 1}}")


def _is_zone(name) -> bool:
    import zoneinfo
    try:
        zoneinfo.ZoneInfo(name)
        return True
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        return False


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _refused(where: str, validate) -> None:
    """Run a contract type's own `validate`, its ValueError as a ConfigError naming `where`."""
    try:
        validate()
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None


def validated(config):
    """`config` if every key is usable (ConfigError naming the first that is not)."""
    _check_server(config)
    for name, p in config.populations.items():
        where = f"populations.{name}"
        check(bool(name) and name.replace("-", "").replace("_", "").isalnum(),
              f"{where}: a population name is letters, digits, '-' and '_'")
        _check_rounds(p, where)
        _check_discovery(p, where)
        if p.update.secure_aggregation:
            _check_secagg(p, where)
            _check_secagg_bodies(p, where, config.max_json_bytes)
        _check_dp(p, where, check)
        _check_cohort(p, where)
        _check_enrollment(p, where)
    return config


def _check_server(config) -> None:
    from server.logs import LEVELS
    from server.store import is_postgres_url

    check(config.workers >= 1 and config.threads >= 1, "workers and threads must be >= 1")
    check(config.aggregation_shards >= 1, "aggregation_shards must be >= 1")
    check(isinstance(config.replica, int) and 0 <= config.replica < 1000, "replica must be an integer in [0, 1000)")
    check(config.replica == 0 or is_postgres_url(config.database),
          "replica > 0 needs a shared PostgreSQL database (database = \"postgresql://...\")")
    check(config.clock_speed > 0, "clock_speed must be > 0")
    check(config.log_level in LEVELS, f"log_level must be one of {', '.join(LEVELS)}")
    check(config.max_upload_bytes > 0 and config.max_json_bytes > 0, "body limits must be > 0")
    for f in dataclasses.fields(config.rate_limits):
        burst, per_s = getattr(config.rate_limits, f.name)
        check(burst >= 0 and per_s > 0, f"rate_limits.{f.name} must be [burst >= 0, seconds > 0]")


def _check_rounds(p, where: str) -> None:
    check(isinstance(p.goal, int) and p.goal >= 1, f"{where}.goal must be an integer >= 1")
    check(p.over_selection >= 1.0, f"{where}.over_selection must be >= 1")
    check(0 < p.min_selected_fraction <= p.over_selection,
          f"{where}.min_selected_fraction must be in (0, over_selection]")
    check(0 < p.min_report_fraction <= 1, f"{where}.min_report_fraction must be in (0, 1]")
    check(p.selection_window_s > 0 and p.reporting_window_s > 0, f"{where}: windows must be > 0")
    check(p.server_optimizer in SERVER_OPTIMIZERS,
          f"{where}.server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}")
    check(p.server_lr >= 0 and p.client_lr >= 0, f"{where}: learning rates must be >= 0")
    check(p.client_epochs >= 1 and p.client_batch_size >= 1, f"{where}: epochs/batch size >= 1")
    check(p.client_max_examples is None or p.client_max_examples >= 1,
          f"{where}.client_max_examples must be >= 1 (or absent: no cap)")
    check(p.eval_every >= 0 and p.publish_every >= 0, f"{where}: eval_every/publish_every >= 0")
    check(len(p.ineligible_retry_s) == 2 and 0 <= p.ineligible_retry_s[0] <= p.ineligible_retry_s[1],
          f"{where}.ineligible_retry_s must be [min, max] with 0 <= min <= max")
    try:
        p.update.validate(f"{where}.update")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_cohort(p, where: str) -> None:
    if p.personalization is not None:
        _refused(where, p.personalization.validate)
    check(isinstance(p.personal_eval_every, int) and p.personal_eval_every >= 0 and (
        p.personalization is not None or not p.personal_eval_every),
          f"{where}.personal_eval_every must be an integer >= 0, and needs a [{where}.personalization] table")
    check(isinstance(p.min_round_size, int) and p.min_round_size >= 1,
          f"{where}.min_round_size must be an integer >= 1")
    check(p.goal >= p.min_round_size, f"{where}.goal ({p.goal}) is below min_round_size "
          f"({p.min_round_size}): no round could ever complete")


def _check_discovery(p, where: str) -> None:
    check(isinstance(p.discovery.every, int) and p.discovery.every >= 0,
          f"{where}.discovery.every must be an integer >= 0")
    _refused(where, p.discovery.spec.validate)
    check(isinstance(p.discovery.goal, int) and (p.discovery.goal == 0 or p.discovery.goal >= p.min_round_size),
          f"{where}.discovery.goal must be 0 (the population's goal) or >= min_round_size")
    selected = dataclasses.replace(p, goal=p.discovery.goal).max_selected if p.discovery.goal else p.max_selected
    check(p.discovery.every == 0 or p.discovery.min_devices <= selected,
          f"{where}.discovery.min_devices ({p.discovery.min_devices}) exceeds the devices a discover round "
          f"selects ({selected}): no prefix could ever be found")


def _check_secagg(p, where: str) -> None:
    a = p.secagg
    check(a.neighbours is None or (isinstance(a.neighbours, int) and a.neighbours >= 2 and a.neighbours % 2 == 0),
          f"{where}.secagg.neighbours must be an even integer >= 2 (or absent: O(log n))")
    check(0 <= a.max_dropout < 0.5, f"{where}.secagg.max_dropout must be in [0, 0.5): more than "
          "half leaving can never leave t > k/2 of a device's neighbours")
    check(0 < a.keys_window_s and 0 < a.shares_window_s and a.keys_window_s + a.shares_window_s
          < p.reporting_window_s and a.unmask_window_s > 0, f"{where}.secagg: windows must be > 0, "
          "and keys_window_s + shares_window_s < reporting_window_s")
    check(p.min_round_size >= 3, f"{where}: secure aggregation needs min_round_size >= 3 "
          "(a sum of one or two updates reveals them to the others)")
    try:
        p.update.bind(1, "0" * 64, "check", 0, p.max_selected)
    except ValueError as e:
        raise ConfigError(f"{where}.update: {e}") from None


def _check_secagg_bodies(p, where: str, max_json_bytes: int) -> None:
    """The round's neighbour count k against the JSON body cap: an honest device sends one share per
    neighbour and reveals at most one per neighbour, and each body must fit (else every honest device's
    shares request would be refused 413)."""
    from contract.secagg.masking import default_degree
    from contract.secagg.messages import SecAggReveal, SecAggShares, items_within, largest_body

    n = p.max_selected
    k = min(p.secagg.neighbours or default_degree(n, p.secagg.max_dropout), n - 1)
    for message in (SecAggShares, SecAggReveal):
        most = items_within(message, max_json_bytes)
        check(k <= most, f"{where}.secagg.neighbours: rounds of up to {n} devices give each up to {k} neighbours, "
              f"and an honest device's {message.__name__} body would then be up to {largest_body(message, k)} "
              f"bytes, over max_json_bytes ({max_json_bytes}): set secagg.neighbours to at most {most} "
              "(or raise max_json_bytes)")


def _check_enrollment(p, where: str) -> None:
    n = p.enrollment
    check(n.verifier in VERIFIERS, f"{where}.enrollment.verifier must be one of {', '.join(VERIFIERS)}")
    check(n.nonce_ttl_s > 0, f"{where}.enrollment.nonce_ttl_s must be > 0")
    check(n.app_credential_sha256 is None or (len(n.app_credential_sha256) == 64 and all(
        c in "0123456789abcdef" for c in n.app_credential_sha256)),
          f"{where}.enrollment.app_credential_sha256 must be 64 lowercase hex digits")
    if n.issuer_public_key is not None:
        from contract.protocol.attestation import public_key_from_text
        try:
            public_key_from_text(n.issuer_public_key)
        except ValueError as e:
            raise ConfigError(f"{where}.enrollment.issuer_public_key: {e}") from None
    for key in ("min_runtime_version", "max_runtime_version"):
        value = getattr(p.eligibility, key)
        check(value is None or (isinstance(value, str) and all(
            part.isdigit() for part in value.split(".")) and 1 <= len(value.split(".")) <= 4),
              f"{where}.eligibility.{key} must be dotted integers like '1.2.0'")
    check(bool(p.time_zones) and all(_is_zone(z) for z in p.time_zones),
          f"{where}.time_zones must be a list of IANA time zone names such as 'Europe/Berlin'")
    e = p.eligibility
    check(0.0 <= e.min_battery <= 1.0, f"{where}.eligibility.min_battery must be in [0, 1]")
    check(e.min_separation_s >= 0, f"{where}.eligibility.min_separation_s must be >= 0")
