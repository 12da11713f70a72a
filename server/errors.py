"""The server's one domain error type is the protocol's: `contract.protocol.errors.ProtocolError`.

Service modules raise `ProtocolError(ErrorCode.X, message)` and never import
Flask; `server.app` turns it into `{"error": code, "message": ...}` with the
code's HTTP status. A request that raises one has changed no stored state:
every service validates before it opens its write transaction, or raises
inside it (rolling it back).
"""
from contract.protocol.errors import ErrorCode, ProtocolError

__all__ = ["ErrorCode", "ProtocolError"]
