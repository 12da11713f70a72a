"""The fleet emulator: its phones' days, its fault injection, its bounds, and its command line."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time

import psutil
import pytest

from emulation.deployment import REPO, simulated_clock, start_server
from emulation.models import tiny_corpus, tiny_model
from emulation.phones import PlanPool
from emulation.world import FaultInjector, Faults, FleetMix, PhoneProfile, ScheduledConditions, make_profiles
from tests.e2e import FLEET_POPULATION, NIGHT_UTC


def profile(**overrides) -> PhoneProfile:
    base = dict(index=0, client_id="c", utc_offset_s=0.0, habit="overnight", plug_in_h=22.5,
                unplug_h=7.0, bedtime_h=23.0, wake_h=6.5, home_wifi=True, free_memory_mb=4000,
                speed_factor=1.0, slow=False, seed=0)
    return PhoneProfile(**{**base, **overrides})


def conditions_at(p: PhoneProfile, hour: float, sim_now: float = 0.0) -> ScheduledConditions:
    t = dt.datetime(2026, 11, 23) + dt.timedelta(hours=hour)
    return ScheduledConditions(p, lambda: t, lambda: sim_now)


def test_an_overnight_phone_is_eligible_at_night_only():
    night = conditions_at(profile(), 26.0).read()          # 02:00
    assert night.charging and night.idle and night.unmetered and night.battery > 0.9
    day = conditions_at(profile(), 14.0).read()
    assert not day.charging and not day.idle and not day.unmetered
    assert not conditions_at(profile(home_wifi=False), 26.0).read().unmetered
    daytime = profile(habit="daytime", plug_in_h=13.0, unplug_h=17.0)
    assert not conditions_at(daytime, 26.0).read().charging and conditions_at(daytime, 14.0).read().charging


def test_the_owner_can_pull_the_plug_after_a_given_reading():
    now = [0.0]
    c = ScheduledConditions(profile(), lambda: dt.datetime(2026, 11, 24, 2), lambda: now[0])
    c.unplug_after_reads(2, hold_s=3600)
    assert c.read().charging
    assert not c.read().charging
    now[0] = 3599
    assert not c.read().charging
    now[0] = 3601
    assert c.read().charging


def test_profiles_follow_the_mix_and_the_seed():
    mix = FleetMix(zones_h=(-5.0, 9.0), early_fraction=0.2, daytime_fraction=0.1, slow_fraction=0.05)
    phones = make_profiles(2000, ["a", "b", "c"], mix, seed=3)
    assert phones == make_profiles(2000, ["a", "b", "c"], mix, seed=3)
    assert {p.utc_offset_s for p in phones} == {-5 * 3600.0, 9 * 3600.0}
    assert [p.client_id for p in phones[:4]] == ["a", "b", "c", "a"]
    share = {h: sum(p.habit == h for p in phones) / len(phones) for h in ("early", "daytime", "overnight")}
    assert abs(share["early"] - 0.2) < 0.03 and abs(share["daytime"] - 0.1) < 0.03
    assert abs(sum(p.slow for p in phones) / len(phones) - 0.05) < 0.02
    assert all(1.0 <= p.speed_factor <= 8.0 for p in phones)


def test_faults_hit_exact_fractions_and_an_upload_only_once():
    f = FaultInjector(Faults(unplug_fraction=0.3, upload_failure_fraction=0.1, seed=5))
    assert sum(f.unplug() for _ in range(100)) == 30
    lost = [f.lose_upload(f"http://x/v1/sessions/s{i}/update") for i in range(1000)]
    assert sum(x is not None for x in lost) == 100
    assert 30 < lost.count("request_lost") < 70
    first = next(i for i, x in enumerate(lost) if x)
    assert f.lose_upload(f"http://x/v1/sessions/s{first}/update") is None   # the retry goes through
    assert f.injected["unplugged"] == 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    return root, tiny_model(root / "model", tiny_corpus())


def test_the_plan_pool_bounds_training_and_interpreters(tiny):
    _, model = tiny
    pool = PlanPool(slots=2)
    busy, peak, lock = [0], [0], threading.Lock()

    def train() -> None:
        plan = pool.acquire("k", lambda: model.plan_dir / "plan.manifest.json")
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        plan.set_weights(model.flat)
        time.sleep(0.05)
        with lock:
            busy[0] -= 1
        pool.release("k", plan)

    threads = [threading.Thread(target=train) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2 and pool.loaded <= 2 and pool.busy == 0


@pytest.mark.slow
@pytest.mark.corpus   # the phones' users come from the real corpus
def test_the_fleet_command_runs_rounds_against_a_server_and_leaves_nothing_running(tiny):
    root, model = tiny
    server = start_server(root / "server", model, **FLEET_POPULATION,
                          server=simulated_clock(NIGHT_UTC, 240.0))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "emulation", "fleet", "--server", server.url,
             "--server-config", str(server.config), "--population", "en", "--data", str(root / "phones"),
             "--phones", "16", "--rounds", "2", "--max-wall-s", "90", "--zones", "0,1",
             "--unplug-fraction", "0.3", "--summary-json", str(root / "summary.json")],
            cwd=REPO, capture_output=True, text=True, timeout=180)
    finally:
        server.kill()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training rounds completed" in done.stdout and "interrupted: unplugged" in done.stdout
    summary = json.loads((root / "summary.json").read_text())
    assert summary["train_rounds_completed"] >= 2 and summary["runtime_errors"] == 0
    assert summary["phones"] == 16
    assert 2 <= len(list((root / "phones" / "phones").iterdir())) <= 16   # phones that were ever eligible
    assert not [p for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
