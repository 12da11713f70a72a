"""Nightjar's federated-learning server: device protocol, rounds, aggregation, versions.

Public surface: `create_app(config)` (the Flask application factory) and the
configuration classes. Nothing here imports TensorFlow: publishing runs the
exporter in a child process (server.publisher). `python -m server --help`
lists the commands (init, run, status, rollback, publish).
"""
from server.config import EligibilityConfig, PopulationConfig, ServerConfig, load_config


def create_app(config=None, **kwargs):
    """See `server.app.create_app` (imported lazily so `import server` stays light)."""
    from server.app import create_app as _create_app

    return _create_app(config, **kwargs)


__all__ = ["create_app", "ServerConfig", "PopulationConfig", "EligibilityConfig", "load_config"]
