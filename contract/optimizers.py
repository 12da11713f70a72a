"""The server optimizers by name: what a population's `server_optimizer` may say, in the server and in simulation.

Each name is TFF 0.87's optimizer of that name (`tff.learning.optimizers`):
`sgd` (plain server SGD; FedAvg at learning rate 1), `sgdm` (SGD with
momentum), `adam`, `yogi`. The server runs NumPy transcriptions of them
(server.optimizers), the simulation TFF's own (models.simulate).
"""
SERVER_OPTIMIZERS: tuple[str, ...] = ("sgd", "sgdm", "adam", "yogi")
