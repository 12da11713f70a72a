"""Privacy accounting for the server's ledger and the simulation: (ε, δ) of DP-FedAvg rounds (`accounting`,
Poisson sampling assumed) and of DP-FTRL under (k, b)-participation (`ftrl`, `sensitivity`)."""
