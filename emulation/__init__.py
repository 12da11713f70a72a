"""Everything that stands in for the world around the product, on one machine.

Not part of what ships to a phone or a server; tests, benchmarks and
`make demo` use it:

* `fleet`, `phones`, `world`, `report` — N real phone runtimes
  (`device_runtime.runtime.Device`) against a real server, in simulated time,
  with their owners' days and injected faults (`python -m emulation fleet`);
* `server_process` — the real server (`python -m server run`) as a child
  process, always stopped;
* `deployment` — a model, its training plan, a server config and a running
  server, built the way an operator would.
"""
