# Nightjar — the two commands a user needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup corpus demo test bench bench-quality bench-server clean

setup: $(STAMP)

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

corpus: setup
	$(PY) -m models corpus

test: setup corpus
	$(PY) -m pytest

demo: setup corpus
	$(PY) -m models simulate --config tiny --rounds 5 --out runs/demo

bench-quality: setup corpus
	$(PY) -m benchmarks.quality

.PHONY: bench-export
bench-export: setup corpus
	$(PY) -m benchmarks.export

# The Flask server under gunicorn on loopback against emulated devices (about a minute).
bench-server: setup
	$(PY) -m benchmarks.server

bench: bench-quality bench-export bench-server

clean:
	rm -rf $(VENV) runs
