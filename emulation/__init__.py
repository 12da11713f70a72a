"""Everything that stands in for the world around the product, on one machine.

Not part of what ships to a phone or a server; tests, benchmarks and
`make demo` use it:

* `fleet`, `phones`, `world`, `report` — N real phone runtimes
  (`device_runtime.runtime.Device`) against a real server, in simulated time,
  with their owners' days and injected faults (`python -m emulation fleet`);
* `deployment` — a server config, the population initialised and the server
  running (deploy.server_process), built the way an operator would;
  TensorFlow-free;
* `models` — the model it is initialised with: a checkpoint, its vocabulary
  and training plan (`python -m emulation tiny-model`); the TensorFlow half;
* `attackers`, `fuzz` — phones that attack, and the protocol fuzzed.

`python -m emulation personalize` has every held-out user's phone
personalize a checkpoint, offline.
"""
