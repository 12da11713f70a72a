"""Protocol versions: which version of the wire a device speaks, and what the server accepts.

Every device request names the protocol version it speaks in the
`Nightjar-Protocol` header (a positive integer). The server serves the
versions in `SUPPORTED` and answers any other — or a request without the
header — 400 `unsupported_protocol`, naming the range it supports, before
anything else is read. A new version is needed for any change an existing
phone could not follow (PROTOCOL.md, "Versions"): a message field added,
removed or retyped, a new stage or a change to the arithmetic of an existing
one, a cryptographic parameter, a new mandatory phase. Adding an optional
server-only field to an answer, a new error code within an existing status,
or a new operator endpoint is not a wire change. Exported files carry their
own version (`contract.artifacts.manifest.SCHEMA_VERSION`): a phone refuses a
plan or app model of a manifest version it does not know.
"""
import re

HEADER = "Nightjar-Protocol"
CURRENT = 1
SUPPORTED = (1, 1)          # inclusive range the server serves


def parse(value: str | None) -> int | None:
    """The version a header value names, written as a positive decimal integer of at most 6 ASCII digits
    without a leading zero ("1"; not "01", " 1" or "²", which str.isdigit takes), else None: each
    version has one spelling, the one the OpenAPI document lists."""
    if value is None or not re.fullmatch(r"[1-9][0-9]{0,5}", value):
        return None
    return int(value)


def supported(value: str | None) -> bool:
    """Whether a request's header value names a version the server serves."""
    version = parse(value)
    return version is not None and SUPPORTED[0] <= version <= SUPPORTED[1]
