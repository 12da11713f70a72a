"""The replica drill: three replicas on PostgreSQL behind nginx, one SIGKILLed again and again.

An emulated fleet trains through nginx (deploy.cluster) while a killer thread
SIGKILLs a random replica (master and workers) at random moments, at least
10 times, and restarts it. Afterwards, from the uploads the phones
themselves recorded:
* every version is parent + the mean of exactly the updates accepted in its
  round (server sgd, lr 1), so no update was counted twice or lost;
* every round transition happened once: one row per round, one version per
  completed training round, and one transition log line across all replicas.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from contract.update.pipeline import UpdatePipeline, aggregate
from contract.update.spec import RoundSpec
from contract.model.weights import load_checkpoint
from emulation.deployment import init_population, simulated_clock, write_server_config
from emulation.models import tiny_corpus, tiny_model
from tests.e2e import FLEET_POPULATION, NIGHT_UTC, run_fleet

pytestmark = [pytest.mark.slow]

KILLS = 10
ROUNDS = 10


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    from deploy.cluster import Cluster
    from deploy.nginx import NginxUnavailable, binary
    from deploy.postgres import PostgresUnavailable, binaries

    try:
        binary(), binaries()
    except (NginxUnavailable, PostgresUnavailable) as e:
        pytest.skip(f"the replica drill needs PostgreSQL and nginx: {e}")
    root = tmp_path_factory.mktemp("drill")
    corpus = tiny_corpus()
    model = tiny_model(root / "model", corpus)
    base = write_server_config(root / "base", "en", **FLEET_POPULATION,
                               server={**simulated_clock(NIGHT_UTC, 240.0), "workers": 1, "threads": 8})
    pg_root = Path(tempfile.mkdtemp(prefix="nightjar-pg-"))      # pytest's tmp is closed to `postgres`
    cluster = Cluster(root / "cluster", base, replicas=3, workers=1, threads=8, fsync=False,
                      pg_root=pg_root).prepare()
    init_population(cluster.config(0), model)
    cluster.start()
    kills, done, stop = [], threading.Event(), threading.Event()
    rng = random.Random(20)
    token = {"Authorization": f"Bearer {(cluster_state_dir(cluster) / 'operator_token').read_text().strip()}"}

    def completed() -> int:
        try:
            reply = requests.get(f"{cluster.url}/v1/populations/en/versions", headers=token, timeout=5)
            return len(reply.json()["versions"]) - 1 if reply.ok else 0
        except (requests.RequestException, ValueError):
            return 0

    def killer():
        while not done.is_set():
            time.sleep(rng.uniform(0.5, 3.0))
            victim = rng.randrange(3)
            cluster.kill(victim)
            kills.append((victim, time.monotonic()))
            time.sleep(rng.uniform(0.2, 1.5))
            cluster.restart(victim)
            if len(kills) >= KILLS and completed() >= ROUNDS:
                stop.set()
                return

    thread = threading.Thread(target=killer, daemon=True)
    server = SimpleNamespace(url=cluster.url, config=cluster.config(0))
    try:
        thread.start()
        run = run_fleet(root / "fleet", server, corpus, phones=24, rounds=10**6, max_wall_s=900.0,
                        stop=stop, keep_uploads=True)
        done.set()
        thread.join(timeout=120)
        versions = requests.get(f"{cluster.url}/v1/populations/en/versions", headers=token, timeout=30).json()
        weights = {}
        for v in versions["versions"]:
            blob = requests.get(f"{cluster.url}/v1/artifacts/{v['checkpoint_sha256']}", headers=token,
                                timeout=30).content
            path = root / f"v{v['version']}.safetensors"
            path.write_bytes(blob)
            weights[v["version"]] = load_checkpoint(path)[1]
        logs = [json.loads(line) for i in range(3) for line in
                (cluster.root / f"replica-{i}.log").read_text().splitlines() if line.startswith('{"ts"')]
        rows = cluster_rounds(cluster)
        yield SimpleNamespace(run=run, kills=kills, versions=versions["versions"], weights=weights, logs=logs,
                              rows=rows)
    finally:
        done.set()
        thread.join(timeout=120)
        cluster.stop()
        shutil.rmtree(pg_root, ignore_errors=True)


def cluster_state_dir(cluster):
    from server.config import load_config

    return load_config(cluster.config(0)).state_dir


def cluster_rounds(cluster) -> list[tuple]:
    import psycopg

    with psycopg.connect(cluster.database_url) as conn:
        return conn.execute("SELECT number, task, state, result_version FROM rounds ORDER BY id").fetchall()


def test_the_drill_killed_a_replica_at_least_ten_times_over_ten_rounds(drill):
    print(f"\nreplica drill: {len(drill.kills)} kills, {len(drill.versions) - 1} versions, "
          f"{len(drill.rows)} rounds, fleet errors {len(drill.run.fleet.errors)}")
    assert len(drill.kills) >= KILLS
    assert sum(1 for r in drill.rows if r[1] == "train" and r[2] == "completed") >= ROUNDS
    assert drill.run.summary["runtime_errors"] == 0, drill.run.fleet.errors


def test_every_version_is_its_parent_plus_the_mean_of_exactly_the_accepted_updates(drill):
    uploads = {}
    for up in drill.run.fleet.uploads:
        if up.status == "accepted":
            uploads.setdefault(up.session_id, up)      # a retry after a lost answer: same body
    errors = []
    for d in drill.run.details:
        if d["task"] != "train" or d["state"] != "completed":
            continue
        accepted = {dev["session_id"]: dev["num_examples"] for dev in d["devices"] if dev["outcome"] == "accepted"}
        told = {sid for sid, u in uploads.items() if u.round == d["round"]}
        assert set(accepted) == told, f"round {d['round']}: accepted on one side only"
        mine = [uploads[s] for s in accepted]
        mean = aggregate(UpdatePipeline(RoundSpec.from_json(d["update"])), [(u.body, u.num_examples) for u in mine])
        moved = drill.weights[d["result_version"]] - drill.weights[d["model_version"]]
        errors.append(float(np.max(np.abs(moved - mean))))
    print(f"\nmax |version - (parent + mean)| over {len(errors)} rounds: {max(errors):.2e}")
    assert len(errors) >= ROUNDS and max(errors) <= 1e-7


def test_every_round_transition_happened_exactly_once(drill):
    numbers = [r[0] for r in drill.rows]
    assert numbers == list(range(1, len(numbers) + 1))                 # one row per round, no gaps
    # rounds go on after the version list was read: compare up to its newest round
    last = max(v["round"] for v in drill.versions if v["round"] is not None)
    done = [r for r in drill.rows if r[2] == "completed" and r[1] == "train" and r[0] <= last]
    assert len(done) == len({r[3] for r in done}) == len(drill.versions) - 1
    assert sorted(v["round"] for v in drill.versions if v["round"] is not None) == sorted(r[0] for r in done)
    closed = [(e["round"], e["state"]) for e in drill.logs
              if e.get("event") == "round_transition" and e["state"] in ("completed", "failed")]
    assert sorted(closed) == sorted(set(closed)), "a round closed twice"   # (a line may be lost in a kill)
