"""User-level differential privacy as phone, server and simulation apply it.

* `noise` — DP-FedAvg's settings, the adaptive clip, the CSPRNG and the noise stages.
* `ftrl` — DP-FTRL's tree noise, regenerated from a secret key and the round (privacy.ftrl accounts it).
"""
