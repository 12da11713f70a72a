# Nightjar — the two commands a user needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup corpus demo test bench bench-quality bench-server clean

FUZZ_VENV  := .venv-fuzz
FUZZ_STAMP := $(FUZZ_VENV)/.installed

setup: $(STAMP) $(FUZZ_STAMP)

# TFF 0.87.0 pins jax/jaxlib 0.4.14, but jaxlib 0.4.14 was never published for
# this platform; requirements.txt pins jaxlib 0.4.13 (which works) and every
# other TFF dependency, and TFF itself goes in with --no-deps so pip does not
# try to resolve the unsatisfiable pin.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip==24.3.1
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps tensorflow-federated==0.87.0
	touch $(STAMP)

# schemathesis (make fuzz, and the short fuzz run of make test) in an environment of its own: it
# needs a newer typing-extensions than TFF allows (requirements-fuzz.txt says why).
$(FUZZ_STAMP): requirements-fuzz.txt
	$(PYTHON) -m venv $(FUZZ_VENV)
	$(FUZZ_VENV)/bin/pip install --quiet --upgrade pip==24.3.1
	$(FUZZ_VENV)/bin/pip install --quiet -r requirements-fuzz.txt
	touch $(FUZZ_STAMP)

corpus: setup
	$(PY) -m models corpus

test: setup corpus
	$(PY) -m pytest

# The whole system on this machine: Gboard-size model, the real server, 240 emulated phones over
# simulated nights, until two app-model versions are published (~10 min on 2 cores).
demo: setup corpus
	$(PY) -m benchmarks.demo

# Three replicas on one PostgreSQL behind nginx (deploy/: Debian's postgresql and nginx packages),
# the population initialised with a tiny model; `make cluster-down` stops it.
.PHONY: cluster cluster-down
cluster: setup
	$(PY) -m emulation tiny-model --out cluster-state/model
	$(PY) -m deploy up --dir cluster-state --config deploy/cluster.toml --replicas 3 --port 8080 \
		--checkpoint cluster-state/model/init.safetensors --vocab cluster-state/model/vocab.json \
		--plan-dir cluster-state/model/plan

cluster-down:
	$(PY) -m deploy down --dir cluster-state

bench-quality: setup corpus
	$(PY) -m benchmarks.quality

.PHONY: bench-export
bench-export: setup corpus
	$(PY) -m benchmarks.export

# 32, 8 and 4 bits per value: held-out quality, upload bytes, encode time, HTTP ingest (~35 min).
.PHONY: bench-compression
bench-compression: setup corpus
	$(PY) -m benchmarks.compression

# SecAgg+ for the Gboard model at 8 bits: 100 and 1000 devices in process, 100 over HTTP (~15 min).
.PHONY: bench-secagg
bench-secagg: setup
	$(PY) -m benchmarks.secagg

# Federated discovery of new words (TrieHH) in simulation over the training users (~1 min).
# Quality against ε from the public-pretrained model: central and distributed DP, projected to
# 10^6 and 10^5 phones, and the honest figure for the simulated population (~75 min); then DP-FTRL
# beside DP-FedAvg at the same ε (δ = 1e-10), rows dp.json lacks only.
.PHONY: bench-dp
bench-dp: setup corpus
	$(PY) -m benchmarks.dp

# Only the DP-FTRL comparison of bench-dp, rerun (its other rows kept from dp.json; ~4 runs of bench-dp's).
.PHONY: bench-dp-ftrl
bench-dp-ftrl: setup corpus
	$(PY) -m benchmarks.dp --rows ftrl

# 1/5/10% attackers (model replacement with a backdoor, a Sybil party, sign flips) against no defence,
# each alone and all together, from the public-pretrained model (simulation, ~5 min a run); then the
# demo's fleet with 10% Sybil attackers through the real server, defended (~12 min).
.PHONY: bench-attacks
bench-attacks: setup corpus
	$(PY) -m benchmarks.attacks
	$(PY) -m benchmarks.attack_fleet

# One hostile phone against the real server (secure and plain rounds, a restart after each attack) and a
# slowloris drill: benchmarks/results/hostile.json (~3 min).
.PHONY: bench-hostile
bench-hostile: setup
	$(PY) -m benchmarks.hostile

# A personal model per held-out user (fine-tuning + the user's word cache, with fallback) against the
# best global model available; fairness figures for both (~10 min; trains a global model if none).
.PHONY: bench-personalization
bench-personalization: setup corpus
	$(PY) -m benchmarks.personalization

.PHONY: bench-discovery
bench-discovery: setup corpus
	$(PY) -m benchmarks.discovery

# schemathesis against the live server from its own /openapi.json: >= 10,000 cases, every phase.
.PHONY: fuzz
fuzz: setup
	$(PY) -m benchmarks.fuzz

# The Flask server under gunicorn on loopback against emulated devices (about a minute).
bench-server: setup
	$(PY) -m benchmarks.server

# Open-loop check-ins, 8-bit ingest and replica loss: SQLite x1, PostgreSQL x1/x2/x3 behind nginx (~10 min).
.PHONY: bench-scale
bench-scale: setup
	$(PY) -m benchmarks.scale

# One phone's task with the Gboard-size plan against the real server: download/train/upload split.
.PHONY: bench-device
bench-device: setup corpus
	$(PY) -m benchmarks.device

# 10,000 emulated phones, rounds of 1,000, through one simulated night (~15 min).
.PHONY: bench-fleet
bench-fleet: setup corpus
	$(PY) -m benchmarks.fleet

# Every benchmark, then benchmarks/REPORT.md (and the README's table) from benchmarks/results/*.json.
bench: bench-quality bench-compression bench-secagg bench-discovery bench-export bench-server bench-device bench-fleet
	$(PY) -m benchmarks.report

# Only regenerate benchmarks/REPORT.md and the README's table from the existing results.
.PHONY: report
report: setup
	$(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) $(FUZZ_VENV) runs
