"""TFF simulation on the tiny config, and that TFF's worker never outlives us."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from models.model import TINY, weight_layout
from models.simulate import SimulationConfig, lr_schedule, run_simulation
from models.tff_runtime import WORKER_NAME, is_alive, worker_processes
from contract.model.weights import load_checkpoint
from emulation.models import tiny_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_corpus():
    return tiny_corpus()


def test_two_round_simulation_decreases_training_loss(small_corpus, tmp_path):
    train_clients = len(small_corpus.train)
    sim = SimulationConfig(rounds=2, clients_per_round=train_clients, local_epochs=2,
                           batch_size=8, client_lr=1.0, server_optimizer="sgd",
                           server_lr=1.0, eval_every=1)
    summary = run_simulation(small_corpus, TINY, sim, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["train"] for r in rows if "train" in r]
    assert len(train) == 2
    assert train[1]["loss"] < train[0]["loss"] - 0.05
    assert summary["final"]["loss"] < summary["initial"]["loss"]
    assert train[0]["num_examples"] == sum(len(w) for w in small_corpus.train.values()) * 2
    # every update went through the deployment's default pipeline: 8 bits, clipped, capped
    rounds = [r for r in rows if "train" in r]
    assert all(len(r["update_norms"]) == r["clients"] == train_clients for r in rounds)
    size = weight_layout(TINY).size
    assert 0.2 * 4 * size < summary["upload_bytes_per_client"] < 0.3 * 4 * size
    assert summary["simulation"]["update"]["bits"] == 8
    # checkpoints are plain tensors readable without TF, and the PNG exists
    layout, flat, meta = load_checkpoint(tmp_path / "checkpoints" / "round_0002.safetensors")
    assert meta["round"] == 2 and flat.shape == (layout.size,)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # run_simulation stopped its worker on the way out
    assert not [p for p in worker_processes() if is_alive(p)]


def test_a_dp_simulation_adapts_its_clip_and_reports_the_ledgers_epsilon(small_corpus, tmp_path):
    from contract.dp.noise import DPSpec
    from privacy.accounting import Event, epsilon

    clients = len(small_corpus.train)
    dp = DPSpec(noise_multiplier=0.5, initial_clip=0.01, clipped_count_stddev=1.0)
    sim = SimulationConfig(rounds=3, clients_per_round=clients, batch_size=8, client_lr=1.0,
                           server_optimizer="sgd", server_lr=1.0, eval_every=3, dp=dp,
                           dp_deploy_reports=5000, dp_population=1_000_000)
    summary = run_simulation(small_corpus, TINY, sim, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    clips = [r["dp_clip"] for r in rows]
    assert clips[0] > 0.01 and clips[2] > clips[1] > clips[0]      # norms far above 0.01: the clip grows
    spent = summary["dp"]
    want = epsilon([Event("central", 0.5, 5000 / 1_000_000)] * 3, 1_000_000 ** -1.1)
    assert spent["epsilon"] == pytest.approx(want.epsilon) and spent["projection"] is True
    assert spent["delta"] == pytest.approx(1e6 ** -1.1) and spent["accountant"] == want.accountant
    assert not [p for p in worker_processes() if is_alive(p)]


def test_a_distributed_dp_simulation_runs_the_phones_pipeline_with_its_noise(small_corpus, tmp_path):
    from contract.dp.noise import DPSpec

    clients = len(small_corpus.train)
    dp = DPSpec(mechanism="distributed", noise_multiplier=0.5, initial_clip=0.01, clipped_count_stddev=1.0)
    sim = SimulationConfig(rounds=2, clients_per_round=clients, batch_size=8, client_lr=1.0,
                           server_optimizer="sgd", server_lr=1.0, eval_every=2, dp=dp,
                           dp_deploy_reports=5000, dp_population=1_000_000)
    summary = run_simulation(small_corpus, TINY, sim, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert rows[1]["dp_clip"] > rows[0]["dp_clip"] > 0.01                   # norms far above 0.01
    assert summary["dp"]["projection"] and summary["final"]["loss"] < summary["initial"]["loss"]


def test_server_lr_schedule_ramps_up_holds_and_ramps_down():
    schedule = lr_schedule(0.03, rounds=100, warmup=10, decay=20)
    lr = [float(schedule(i)) for i in range(100)]
    assert lr[0] == pytest.approx(0.003) and lr[4] == pytest.approx(0.015)
    assert lr[9] == pytest.approx(0.03) and lr[50] == pytest.approx(0.03)
    assert lr[80] == pytest.approx(0.03) and lr[90] == pytest.approx(0.015)
    assert lr[99] == pytest.approx(0.0015)
    assert all(b <= a for a, b in zip(lr[80:], lr[81:]))
    flat = lr_schedule(0.01, rounds=5, warmup=0, decay=0)
    assert [float(flat(i)) for i in range(5)] == pytest.approx([0.01] * 5)


@pytest.mark.parametrize("flag, value, message", [
    ("--server-lr-decay-rounds", "-1", "--server-lr-decay-rounds must be >= 0"),
    ("--server-lr-warmup-rounds", "-5", "--server-lr-warmup-rounds must be >= 0"),
    ("--rounds", "0", "--rounds must be >= 1"),
    ("--update-clip-norm", "0", "--update-clip-norm must be a finite number > 0"),
    ("--update-max-weight", "0", "--update-max-weight must be an integer in [1, 2^31]"),
    ("--dp-noise-multiplier", "1.0", "clipped-count-stddev 0.5 is too small for noise-multiplier 1"),
    ("--dp-deploy-reports", "100", "--dp-deploy-reports, --dp-population and --dp-delta need --dp-noise-multiplier"),
])
def test_simulate_refuses_bad_flags_by_name(flag, value, message, capsys):
    from models.__main__ import main

    assert main(["simulate", "--config", "tiny", flag, value]) == 2
    assert message in capsys.readouterr().err


def _workers_with_marker(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] != WORKER_NAME:
            continue
        try:
            if p.environ().get("NIGHTJAR_RUN_MARKER") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


TFF_SCRIPT = textwrap.dedent("""
    import sys, time
    import tensorflow as tf
    from models.tff_runtime import install_exit_handlers, worker_processes
    install_exit_handlers()
    import tensorflow_federated as tff

    @tff.tensorflow.computation(tf.int32)
    def double(x):
        return x * 2

    assert double(21) == 42
    assert worker_processes(), "TFF did not start a worker"
    print("READY", flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
""")


@pytest.mark.parametrize("how", ["normal-exit", "sigterm"])
def test_no_worker_outlives_a_process_that_used_tff(how):
    marker = uuid.uuid4().hex
    env = {**os.environ, "NIGHTJAR_RUN_MARKER": marker, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", TFF_SCRIPT, "wait" if how == "sigterm" else "exit"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        if how == "sigterm":  # (the script itself asserted that its worker started)
            assert _workers_with_marker(marker), "the worker should run while TFF is in use"
            proc.terminate()
        assert proc.wait(timeout=60) == (0 if how == "normal-exit" else 128 + 15)
    finally:
        proc.kill()
    deadline = time.monotonic() + 10
    while _workers_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked = _workers_with_marker(marker)
    for p in leaked:
        p.kill()
    assert not leaked, f"worker_binary left running after the process exited ({how})"
