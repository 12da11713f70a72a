"""Running Nightjar beyond one process: PostgreSQL, nginx and several server replicas on one machine.

A supervisor, not part of the product: the server (server/) only needs a
`postgresql://` URL and a port. `python -m deploy up` brings up the
multi-replica deployment (`make cluster`); the tests use deploy.postgres for a
throwaway database server.
"""
