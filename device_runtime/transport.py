"""HTTP to the Nightjar server, with bounded retries.

Phones live on flaky networks and servers restart: a connection error, a
timeout, a 429 or a 5xx is retried with exponential backoff and full jitter
(so a fleet that lost the server does not come back in lockstep), a bounded
number of times and within a bounded total delay. A `Retry-After` (seconds)
on such an answer is honoured as the floor of the next backoff, still capped
by `max_delay_s`. A 4xx other than 429 is the server's considered answer and
is returned, not retried.

Every request says which protocol version the phone speaks
(`Nightjar-Protocol`, contract.protocol.version): the server refuses the
device API without it, and an app-model or artifact read with another.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import requests

from contract.protocol import version as protocol
from device_runtime.errors import DeviceError

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class ServerUnavailable(DeviceError):
    """The server could not be reached (or kept failing) within the retry bounds."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5            # total tries, the first included
    base_delay_s: float = 0.5    # backoff before the 2nd try; doubles each time
    max_delay_s: float = 30.0    # cap on one backoff
    timeout_s: float = 30.0      # per-request socket timeout

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2 ** attempt))


class Transport:
    """A `requests.Session` bound to one server, retrying transient failures.

    `sleep` is injectable so the fleet emulator's simulated clock governs the
    backoff; `bytes_sent` / `bytes_received` feed the participation log.
    """

    def __init__(self, base_url: str, retry: RetryPolicy = RetryPolicy(),
                 sleep: Callable[[float], None] | None = None, seed: int | None = None):
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.sleep = sleep or time.sleep
        self.session = requests.Session()
        self.rng = random.Random(seed)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.auth: str | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The server's response (any status but a retryable one), or ServerUnavailable."""
        url = path if path.startswith("http") else self.base_url + path
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault(protocol.HEADER, str(protocol.CURRENT))
        if self.auth:
            headers.setdefault("Authorization", self.auth)
        last_error, floor = "no attempt made", 0.0
        for attempt in range(self.retry.attempts):
            if attempt:
                self.sleep(min(self.retry.max_delay_s,
                               max(floor, self.retry.delay(attempt - 1, self.rng))))
            try:
                resp = self.session.request(method, url, headers=headers,
                                            timeout=self.retry.timeout_s, **kwargs)
            except requests.RequestException as e:
                last_error, floor = f"{type(e).__name__}: {e}", 0.0
                continue
            self.bytes_sent += len(resp.request.body or b"")
            self.bytes_received += len(resp.content)
            if resp.status_code not in RETRYABLE_STATUS:
                return resp
            last_error, floor = f"HTTP {resp.status_code}", _retry_after(resp)
        raise ServerUnavailable(f"{method} {path} failed {self.retry.attempts} times "
                                f"(last: {last_error})")

    def close(self) -> None:
        self.session.close()


def _retry_after(resp: requests.Response) -> float:
    """The answer's Retry-After in seconds (0 if absent or an HTTP date, which we do not parse)."""
    try:
        return max(0.0, float(resp.headers.get("Retry-After", 0)))
    except ValueError:
        return 0.0
