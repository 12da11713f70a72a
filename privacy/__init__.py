"""Privacy accounting: (ε, δ) of a sequence of DP-FedAvg rounds, for the server's ledger and the simulation."""
