"""Discover rounds through the server (Flask test client, manual clock, every answer checked against
/openapi.json): one level per round, votes checked against the trie, counts gone at the close."""
from __future__ import annotations

from tests.server_fixtures import DeviceClient, break_finish
from tests.test_server_views import checked_server, train_one_round

N = 4


def discovering_server(make_server, **discovery):
    return checked_server(make_server, goal=N, over_selection=1.0, min_selected_fraction=1.0, min_report_fraction=0.5,
                          discovery={"every": 1, "min_devices": 3, "votes_per_device": 2, **discovery})


def vote(env, ballots: list[list[str]]) -> list[dict]:
    out = []
    for votes in ballots:
        d = DeviceClient(env.api, "en", env.enrollment)
        a = d.checkin().body["assignment"]
        assert a["task"] == "discover", a
        out.append(a["discovery"])
        reply = env.api.request("POST", a["report"]["url"], headers=d.headers,
                                json={"model_version": a["model_version"], "votes": votes})
        assert reply.status == 200 and reply.body["status"] == "accepted", reply.body
    return out


def summary(env) -> dict:
    reply = env.api.request("GET", "/v1/populations/en/discovery", headers=env.operator_headers)
    assert reply.status == 200
    return reply.body


def test_a_pass_goes_level_by_level_and_keeps_only_what_min_devices_voted_for(make_server):
    env = discovering_server(make_server)
    train_one_round(env, N)
    asks = vote(env, [["h", "z"], ["h"], ["h", "q"], ["h", "z"]])        # z: 2 votes < 3
    assert asks[0]["level"] == 1 and asks[0]["prefixes"] == [""] and asks[0]["min_devices"] == 3
    assert summary(env) == {"pass": 1, "level": 2, "words": []}
    db = env.services.store.connection()
    assert db.execute("SELECT COUNT(*) FROM discovery_votes").fetchone()[0] == 0   # counts gone at close
    asks = vote(env, [["hi"], ["hi"], ["h$"], ["hi"]])
    assert asks[0]["prefixes"] == ["h"]
    asks = vote(env, [["hi$"], ["hi$"], ["hi$"], ["hi$"]])
    assert summary(env)["words"] == ["hi"] and summary(env)["level"] == 0        # the pass ended
    rounds = env.api.request("GET", "/v1/populations/en/rounds", headers=env.operator_headers).body["rounds"]
    assert [r["task"] for r in rounds[:4]] == ["discover"] * 3 + ["train"]
    d = DeviceClient(env.api, "en", env.enrollment)
    assert d.checkin().body["assignment"]["task"] == "train"                     # every = 1 training round


def test_ballots_off_the_trie_are_422_and_change_nothing(make_server):
    env = discovering_server(make_server)
    train_one_round(env, N)
    summary(env)
    d = DeviceClient(env.api, "en", env.enrollment)
    a = d.checkin().body["assignment"]
    for votes in (["hi"], ["h", "h"], ["a", "b", "c"], ["H"], ["h$x"], [""], [7]):
        reply = env.api.request("POST", a["report"]["url"], headers=d.headers,
                                json={"model_version": a["model_version"], "votes": votes})
        assert reply.status in (400, 422) and "error" in reply.body, (votes, reply.body)
    db = env.services.store.connection()
    assert db.execute("SELECT COUNT(*) FROM discovery_votes").fetchone()[0] == 0
    assert db.execute("SELECT state FROM sessions WHERE id = ?", (a["session_id"],)).fetchone()[0] == "assigned"
    ok = env.api.request("POST", a["report"]["url"], headers=d.headers,
                         json={"model_version": a["model_version"], "votes": ["h"]})
    again = env.api.request("POST", a["report"]["url"], headers=d.headers,
                            json={"model_version": a["model_version"], "votes": ["z"]})
    assert ok.body["status"] == "accepted" and again.body == {"status": "accepted", "round": 2, "reason": "duplicate"}
    assert [tuple(r) for r in db.execute("SELECT prefix, votes FROM discovery_votes")] == [("h", 1)]
    wrong = env.api.request("POST", f"/v1/sessions/{a['session_id']}/eval", headers=d.headers,
                            json={"model_version": 0, "top1_hits": 0, "top3_hits": 0, "positions": 0})
    assert wrong.status == 409
    assert {t for (_, t, status) in env.checker.seen if "/discovery" in t and status < 300} == {
        path for path in env.checker.doc["paths"] if "/discovery" in path}


def test_discover_rounds_can_hear_from_more_devices_than_training_rounds(make_server):
    env = discovering_server(make_server, goal=2 * N)
    train_one_round(env, N)
    vote(env, [["h"]] * (2 * N))                               # all 8 selected and counted in one level
    rounds = env.api.request("GET", "/v1/populations/en/rounds", headers=env.operator_headers).body["rounds"]
    assert (rounds[0]["task"], rounds[0]["reported"], rounds[1]["reported"]) == ("discover", 2 * N, N)
    assert summary(env)["level"] == 2


def test_a_discover_finish_that_raises_fails_only_that_round_and_the_level_is_retried(make_server, monkeypatch):
    env = discovering_server(make_server)
    train_one_round(env, N)
    restore = break_finish(env, monkeypatch, "discover")
    vote(env, [["t"], ["t"], ["t"], ["a"]])
    rounds = env.api.request("GET", "/v1/populations/en/rounds", headers=env.operator_headers).body["rounds"]
    assert (rounds[0]["task"], rounds[0]["state"], rounds[0]["reason"]) == ("discover", "failed", "finish_error")
    restore()
    asked = vote(env, [["t"], ["t"], ["t"], ["a"]])
    assert asked[0]["level"] == 1                                        # the same level, asked again
    rounds = env.api.request("GET", "/v1/populations/en/rounds", headers=env.operator_headers).body["rounds"]
    assert (rounds[0]["task"], rounds[0]["state"]) == ("discover", "completed")
    assert summary(env)["level"] == 2
