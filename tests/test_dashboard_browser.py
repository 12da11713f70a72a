"""The dashboard in a real browser (Debian's headless Chromium, driven by Playwright) against the real
server (gunicorn, 2 workers) while an emulated fleet trains, evaluates and publishes; then /metrics,
summed over the workers, against the round analytics.

Steps: a wrong token is refused; the right one signs in; the round counter advances without a reload;
a round's timeline and a version open; a rollback goes through its confirmation. Screenshots go to
benchmarks/results/dashboard/, with the first load's page weight and first paint (page.json).
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from emulation.deployment import simulated_clock
from tests.e2e import FLEET_POPULATION, NIGHT_UTC, run_fleet, tiny_world

pytestmark = pytest.mark.slow
SHOTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "dashboard"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.skip(f"playwright is not installed ({e}): make setup installs it")
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (Debian), as .ci/run does")
    return sync_playwright


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The server, and a fleet training in the background until the test says stop."""
    sync_playwright = _browser()
    root = tmp_path_factory.mktemp("dashboard")
    settings = {**FLEET_POPULATION, "eval_every": 1, "publish_every": 1, "time_zones": ["UTC", "Europe/Paris"]}
    with tiny_world(root, server=simulated_clock(NIGHT_UTC, 120.0), **settings) as (corpus, _, server):
        stop, result = threading.Event(), {}

        def fleet():
            try:
                result["run"] = run_fleet(root / "fleet", server, corpus, phones=20, rounds=10_000,
                                          max_wall_s=400.0, stop=stop)
            except BaseException as e:       # reported by the test that reads it
                result["error"] = e
        thread = threading.Thread(target=fleet, daemon=True)
        thread.start()
        try:
            yield sync_playwright, server, stop, thread, result
        finally:
            stop.set()
            thread.join(timeout=120)


def exported_versions(server) -> list[int]:
    versions = server.operator_get("/v1/populations/en/versions").json()["versions"]
    return sorted(v["version"] for v in versions if v["app_manifest_sha256"])


def test_an_operator_watches_rounds_opens_a_round_and_a_version_and_rolls_back(live):
    sync_playwright, server, stop, _, _ = live
    from deploy.server_process import operator_token

    SHOTS.mkdir(parents=True, exist_ok=True)
    base = f"http://localhost:{server.port}"        # a secure context: Chromium keeps Secure cookies here
    token = operator_token(server.config)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{base}/dashboard")
            assert page.url.endswith("/dashboard/login")
            page.fill("#token", token + "-wrong")
            page.click("#sign-in")
            assert "not the operator token" in page.inner_text("#login-error")
            assert page.context.cookies() == []
            page.screenshot(path=SHOTS / "login-refused.png")

            page.fill("#token", token)
            page.click("#sign-in")
            page.wait_for_selector(".current-round")
            cookie = next(c for c in page.context.cookies() if c["name"] == "nightjar_dashboard")
            assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            first_paint = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]?.startTime")
            # bytes on the wire for the overview's first load: the document, its CSS and JS
            page_weight = page.evaluate("performance.getEntriesByType('navigation').concat("
                                        "performance.getEntriesByType('resource'))"
                                        ".reduce((n, e) => n + e.transferSize, 0)")

            # the round counter moves while the page stays the same document (no reload)
            page.evaluate("window.__same_document = true")
            start = int(page.inner_text(".current-round"))
            deadline = time.monotonic() + 180          # polled from here: the page's CSP forbids eval
            while int(page.inner_text(".current-round")) <= start and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            assert int(page.inner_text(".current-round")) > start, "the round counter did not move in 3 min"
            assert page.evaluate("window.__same_document === true")
            assert "updated" in page.inner_text("#updated")
            page.screenshot(path=SHOTS / "overview.png", full_page=True)

            page.click("#population-en h2 a")
            page.wait_for_selector(".round-link")
            page.screenshot(path=SHOTS / "rounds.png", full_page=True)
            page.click(".round-link")
            page.wait_for_selector("#round-title")
            assert page.locator("#devices tbody tr").count() >= 1
            assert all(t.startswith("p-") for t in page.locator("#devices tbody code").all_inner_texts())
            page.screenshot(path=SHOTS / "round.png", full_page=True)

            for name in ("participation", "health"):
                page.goto(f"{base}/dashboard/p/en/{name}")
                page.wait_for_selector("svg.chart")
                page.screenshot(path=SHOTS / f"{name}.png", full_page=True)

            deadline = time.monotonic() + 240
            while len(exported_versions(server)) < 2 and time.monotonic() < deadline:
                time.sleep(2)
            exported = exported_versions(server)
            assert len(exported) >= 2, f"only {exported} exported for apps in 4 minutes"
            page.goto(f"{base}/dashboard/p/en/versions")
            live_version = int(page.inner_text("#published").lstrip("v"))
            target = max(v for v in exported if v != live_version)
            page.click(f"button[data-rollback='{target}']")
            assert page.is_visible("#confirm-rollback")
            page.screenshot(path=SHOTS / "rollback-confirm.png")
            page.click("#confirm-rollback-button")
            page.wait_for_selector("#notice")
            assert page.inner_text("#notice") == f"Apps now get version {target}."
            assert requests.get(f"{server.url}/v1/populations/en/app-model", timeout=10).json()["version"] == target
            page.screenshot(path=SHOTS / "versions.png", full_page=True)
            page.click(f"a.version-link[href$='/versions/{target}']")
            page.wait_for_selector("#lineage")
            assert page.locator("#lineage li").count() == target + 1
            page.screenshot(path=SHOTS / "version.png", full_page=True)

            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.context.add_cookies([cookie])
            phone.goto(f"{base}/dashboard/p/en/rounds")
            phone.wait_for_selector("svg.chart")
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390    # no sideways page
            phone.screenshot(path=SHOTS / "rounds-phone.png", full_page=True)
        finally:
            browser.close()
    (SHOTS / "page.json").write_text(json.dumps({
        "first_load_bytes": page_weight, "first_contentful_paint_ms": first_paint,
        "browser": "Debian chromium, headless, via playwright", "page": "/dashboard (overview)"}, indent=1) + "\n")
    print(f"dashboard first load: {page_weight} bytes, first contentful paint {first_paint:.0f} ms")
    stop.set()


def test_metrics_summed_over_the_workers_equal_the_round_analytics(live):
    _, server, stop, thread, result = live
    stop.set()
    thread.join(timeout=180)
    assert "error" not in result, result.get("error")
    time.sleep(1.0)                              # the ticker's last transitions
    rounds = server.operator_get("/v1/populations/en/rounds?limit=1000").json()["rounds"]
    assert sum(r["state"] == "completed" for r in rounds) >= 3
    reasons: dict[str, int] = {}
    for r in rounds:
        detail = server.operator_get(f"/v1/populations/en/rounds/{r['round']}").json()
        for reason, n in detail["failure_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    text = server.operator_get("/metrics").text
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 401
    totals: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total") and s.labels.get("population") == "en":
                key = (s.name, s.labels.get("outcome") or s.labels.get("status") or s.labels.get("reason"))
                totals[key] = totals.get(key, 0.0) + s.value

    def total(name: str) -> float:
        return sum(v for (n, _), v in totals.items() if n == name)

    aborted = total("nightjar_uploads_total") - totals.get(("nightjar_uploads_total", "accepted"), 0) \
        - totals.get(("nightjar_uploads_total", "duplicate"), 0)
    assert totals[("nightjar_checkins_total", "selected")] == sum(r["selected"] for r in rounds)
    assert totals[("nightjar_uploads_total", "accepted")] == sum(r["reported"] for r in rounds)
    assert aborted == sum(r["aborted"] for r in rounds)
    assert {k[1]: v for k, v in totals.items() if k[0] == "nightjar_session_failures_total"} == reasons
    assert total("nightjar_received_bytes_total") == sum(r["bytes_in"] for r in rounds)
    assert total("nightjar_sent_bytes_total") == sum(r["bytes_out"] for r in rounds)
    workers = {p.name.split("_")[-1] for p in (Path(server.config).parent / "state" / "private" / "prometheus" / "replica-0")
               .glob("counter_*.db")}
    assert len(workers) >= 2, workers          # both workers counted, and their counts were added up
