"""The operator dashboard, /metrics and the JSON logs, over Flask's test client (the browser test is
test_dashboard_browser.py): nothing answers without a session, no device id reaches a page, the rollback
needs its confirmation form, and the counters say what the round analytics say."""
from __future__ import annotations

import json
import re

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.server_fixtures import DeviceClient, FlaskTransport

POPULATION_ROUTE_VALUES = {"population": "en", "number": 1}


def play_round(env, reports: int = 3, fail: int = 1) -> list[DeviceClient]:
    """One training round over HTTP: `reports` uploads, `fail` failures, the rest left open."""
    api = FlaskTransport(env.client)
    devices = [DeviceClient(api, env.population, env.enrollment) for _ in range(reports + fail)]
    for d in devices:
        assert "assignment" in d.checkin().body
    delta = np.full(env.layout.size, 1e-3, np.float32)
    for d in devices[:reports]:
        assert d.upload(delta, 10).body["status"] == "accepted"
    for d in devices[reports:]:
        assert d.fail("unplugged").status == 200
    return devices


BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def sign_in(client, token: str, headers: dict | None = None):
    return client.post("/dashboard/login", data={"token": token}, headers=headers or BROWSER)


def dashboard_urls(app) -> list[tuple[str, str]]:
    """(method, url) of every dashboard route but the login and the static files."""
    out = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/dashboard") or rule.endpoint in (
                "dashboard.login", "dashboard.sign_in", "dashboard.static"):
            continue
        url = rule.rule
        for name in rule.arguments:
            value = 0 if name == "number" and "/versions/" in url else POPULATION_ROUTE_VALUES[name]
            url = re.sub(rf"<[^>]*{name}>", str(value), url)
        out += [(m, url) for m in rule.methods - {"HEAD", "OPTIONS"}]
    return sorted(out)


def test_without_a_session_nothing_but_the_login_answers(server_env):
    env = server_env
    play_round(env)
    urls = dashboard_urls(env.app)
    assert len(urls) >= 9
    for method, url in urls:
        for headers in ({}, {"X-Dashboard-Fragment": "1"}, env.operator_headers):   # a Bearer is no session
            r = env.client.open(url, method=method, headers=headers)
            if method == "GET" and "X-Dashboard-Fragment" not in headers:
                assert r.status_code == 303 and r.headers["Location"].endswith("/dashboard/login"), url
            else:
                assert r.status_code == 401 and r.get_json()["error"] == "unauthorized", (method, url)
    assert env.client.get("/dashboard/login").status_code == 200
    assert env.client.get("/metrics").status_code == 401


def test_the_login_sets_a_strict_cookie_and_a_wrong_or_forged_one_is_refused(server_env):
    env = server_env
    token = env.services.operator_token
    wrong = sign_in(env.client, token + "x")
    assert wrong.status_code == 401 and b"That is not the operator token." in wrong.data   # the form again
    assert "Set-Cookie" not in wrong.headers
    script = sign_in(env.client, token + "x", headers={"Accept": "application/json"})
    assert script.status_code == 401 and script.get_json()["error"] == "unauthorized"
    assert env.client.get("/dashboard").status_code == 303
    right = sign_in(env.client, token)
    assert right.status_code == 303 and right.headers["Location"].endswith("/dashboard")
    cookie = right.headers["Set-Cookie"]
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/dashboard"):
        assert attribute in cookie
    assert token not in cookie and token not in right.headers["Location"]
    assert env.client.get("/dashboard").status_code == 200
    value = cookie.split(";")[0].split("=", 1)[1]
    expiry, mac = value.split(".")
    forged = env.app.test_client()
    forged.set_cookie("nightjar_dashboard", f"{int(expiry) + 1}.{mac}", path="/dashboard")
    assert forged.get("/dashboard").status_code == 303
    assert env.client.post("/dashboard/logout").status_code == 303


def test_every_page_and_fragment_renders_with_pseudonyms_and_never_a_device_id(server_env):
    env = server_env
    devices = play_round(env)
    sign_in(env.client, env.services.operator_token)
    pages = [url for method, url in dashboard_urls(env.app) if method == "GET"]
    seen = b""
    for url in pages:
        for headers in ({}, {"X-Dashboard-Fragment": "1"}):
            r = env.client.get(url, headers=headers)
            assert r.status_code == 200, (url, r.data[:300])
            assert r.headers["Cache-Control"] == "no-store" and "frame-ancestors 'none'" in \
                r.headers["Content-Security-Policy"]
            assert (b"<html" in r.data) == (not headers), url
            seen += r.data
    for d in devices:
        assert d.device_id.encode() not in seen and d.secret.encode() not in seen
    round_page = env.client.get("/dashboard/p/en/rounds/1").data.decode()
    pseudonyms = {env.services.registry.pseudonym(d.device_id) for d in devices}
    assert pseudonyms <= set(re.findall(r"<code>(p-[^<]+)</code>", round_page))
    assert "unplugged: 1" in round_page
    overview = env.client.get("/dashboard").data.decode()
    assert re.search(r'class="current-round" data-population="en">1<', overview)


def published_twice(make_server):
    """A population with versions 1 and 3 exported for apps, 3 live (test_server_rounds' scenario)."""
    from tests.test_server_rounds import Dev, deltas

    env = make_server(goal=2, over_selection=1.0, eval_every=1, publish_every=1)
    for seed, top3 in ((0, 30), (1, 20), (2, 40)):
        devs = [Dev(env), Dev(env)]
        for i, dev in enumerate(devs):
            dev.checkin()
            dev.upload(deltas(env, 2, seed)[i])
        devs = [Dev(env), Dev(env)]
        for dev in devs:
            assert dev.checkin().task == "eval"
            dev.evaluate(top3 // 2, top3, 100)
        env.services.publisher.run_pending()
    assert env.services.versions.published("en").version == 3
    return env


def test_rollback_goes_through_the_confirmation_form_with_its_csrf_token(make_server):
    env = published_twice(make_server)
    sign_in(env.client, env.services.operator_token)
    page = env.client.get("/dashboard/p/en/versions").data.decode()
    assert 'data-rollback="1"' in page and 'data-rollback="3"' not in page     # the live one has no button
    assert 'id="confirm-rollback"' in page
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)
    refused = env.client.post("/dashboard/p/en/rollback", data={"to": "1", "csrf": "0" * 64})
    assert refused.status_code == 403 and env.services.versions.published("en").version == 3
    bad = env.client.post("/dashboard/p/en/rollback", data={"to": "2", "csrf": csrf}, headers=BROWSER)
    assert bad.status_code == 409 and b'id="error">version 2 of' in bad.data and b"never exported" in bad.data
    bad = env.client.post("/dashboard/p/en/rollback", data={"to": "2", "csrf": csrf})
    assert bad.status_code == 409 and bad.get_json()["error"] == "conflict"
    assert env.services.versions.published("en").version == 3
    done = env.client.post("/dashboard/p/en/rollback", data={"to": "1", "csrf": csrf})
    assert done.status_code == 303 and done.headers["Location"].endswith("/versions?rolled_back=1")
    assert env.services.versions.published("en").version == 1
    assert env.client.get("/v1/populations/en/app-model").get_json()["version"] == 1
    after = env.client.get(done.headers["Location"]).data.decode()
    assert "Apps now get version 1." in after and '<strong id="published">v1</strong>' in after
    detail = env.client.get("/dashboard/p/en/versions/3").data.decode()
    assert re.findall(r"<li>(?:<a [^>]*>)?v(\d+)", detail) == ["3", "2", "1", "0"]   # its lineage


def counters(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total"):
                out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def test_metrics_parse_and_count_what_the_round_analytics_say(server_env):
    env = server_env
    before = counters(env.client.get("/metrics", headers=env.operator_headers).data.decode())
    play_round(env, reports=3, fail=1)
    r = env.client.get("/metrics", headers=env.operator_headers)
    assert r.status_code == 200 and r.mimetype == "text/plain"
    after = counters(r.data.decode())

    def delta(name, **labels):
        key = (name, *sorted({"population": "en", **labels}.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    (row,) = env.services.analytics.list("en", env.clock.now())
    assert delta("nightjar_checkins_total", outcome="selected") == row["selected"] == 4
    assert delta("nightjar_uploads_total", task="train", status="accepted") == row["reported"] == 3
    assert delta("nightjar_session_failures_total", reason="unplugged") == row["failed"] == 1
    assert delta("nightjar_received_bytes_total") == row["bytes_in"] > 0
    assert delta("nightjar_sent_bytes_total") == row["bytes_out"] > 0
    families = {f.name: f for f in text_string_to_metric_families(r.data.decode())}
    (gauge,) = families["nightjar_open_round_reports"].samples
    assert gauge.value == 3 and gauge.labels == {"population": "en", "task": "train"}
    latency = {s.labels["endpoint"] for s in families["nightjar_request_duration_seconds"].samples}
    assert {"devices.checkin", "sessions.upload"} <= latency


def test_each_request_is_one_json_log_line_naming_the_device_by_pseudonym(server_env, capsys):
    env = server_env
    capsys.readouterr()
    (device,) = play_round(env, reports=1, fail=0)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    requests_ = [x for x in lines if x.get("event") == "request"]
    checkin = next(x for x in requests_ if x["endpoint"] == "devices.checkin")
    assert checkin["status"] == 200 and checkin["latency_ms"] > 0 and re.fullmatch(r"[0-9a-f]{16}",
                                                                                   checkin["request_id"])
    assert checkin["device"] == env.services.registry.pseudonym(device.device_id)
    assert all(device.device_id not in json.dumps(x) for x in lines)
    reply = env.client.get("/healthz", headers={"X-Request-Id": "trace-42"})
    assert reply.headers["X-Request-Id"] == "trace-42"
    env.clock.advance(10_000)
    env.services.tick()
    transitions = [json.loads(line) for line in capsys.readouterr().err.splitlines()
                   if '"round_transition"' in line]
    assert any(t["state"] == "failed" and t["round"] == 1 for t in transitions)


def test_events_count_only_when_their_transaction_commits(server_env):
    store, ran = server_env.services.store, []
    try:
        with store.write():
            store.on_commit(lambda: ran.append("rolled back"))
            raise RuntimeError("abort the transaction")
    except RuntimeError:
        pass
    with store.write():
        with store.write():                     # a nested write joins the outer transaction
            store.on_commit(lambda: ran.append("committed"))
        assert ran == []                        # not before the outer COMMIT
    store.on_commit(lambda: ran.append("no transaction"))
    assert ran == ["committed", "no transaction"]
