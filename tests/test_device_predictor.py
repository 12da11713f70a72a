"""The predictor's swap under concurrent suggestions, with real exported app models (TINY)."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from device_runtime.predictor import Predictor
from models.model import TINY
from models.simulate import initial_weights
from emulation.models import tiny_corpus

pytestmark = pytest.mark.slow
VERSIONS = (1, 2, 3, 4)
CONTEXTS = ("", "the king", "my lord doth", "the queen shall come to the", "good friend. the fool")


@pytest.fixture(scope="module")
def app_models(tmp_path_factory):
    """Manifest path per version: the same architecture and vocabulary, different weights."""
    from tflite_export import export_app_model

    root = tmp_path_factory.mktemp("app_models")
    corpus = tiny_corpus()
    config = TINY.with_vocab(len(corpus.vocab))
    return {v: export_app_model(config, initial_weights(dataclasses.replace(config, init_seed=v)),
                                corpus.vocab, root / f"v{v}", k=3, model_version=v)
            for v in VERSIONS}


@pytest.fixture(scope="module")
def expected(app_models):
    """What each version answers for each context, computed by a predictor of its own."""
    answers = {}
    for v, manifest in app_models.items():
        alone = Predictor()
        alone.install(manifest)
        answers[v] = {c: alone.suggest(c) for c in CONTEXTS}
        assert answers[v] == {c: alone.suggest(c) for c in CONTEXTS}     # deterministic
    for c in CONTEXTS:   # every version answers every context differently, so an answer names its version
        assert len({repr(answers[v][c]) for v in VERSIONS}) == len(VERSIONS), c
    return answers


def test_swap_is_atomic_under_concurrent_suggestions(app_models, expected):
    predictor = Predictor()
    predictor.install(app_models[VERSIONS[0]])
    which = {(c, repr(expected[v][c])): v for v in VERSIONS for c in CONTEXTS}
    stop = threading.Event()
    last_installed_at: list[float] = []
    calls: list[list[tuple[float, int]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def suggest_loop(log: list[tuple[float, int]], offset: int) -> None:
        try:
            i = offset
            while not stop.is_set():
                context = CONTEXTS[i % len(CONTEXTS)]
                started = time.monotonic()
                answer = predictor.suggest(context)
                version = which.get((context, repr(answer)))
                assert version is not None, f"answer of no installed version for {context!r}: {answer}"
                log.append((started, version))
                i += 1
        except BaseException as e:   # reported by the main thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=suggest_loop, args=(log, n)) for n, log in enumerate(calls)]
    for t in threads:
        t.start()
    try:
        for v in VERSIONS[1:]:
            time.sleep(0.15)
            assert predictor.install(app_models[v]) == v
        last_installed_at.append(time.monotonic())
        time.sleep(0.15)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[0]
    for log in calls:
        versions = [v for _, v in log]
        assert versions == sorted(versions), "a thread saw the version go backwards"
        after = [v for started, v in log if started > last_installed_at[0]]
        assert after and set(after) == {VERSIONS[-1]}
    seen = {v for log in calls for _, v in log}
    assert seen == set(VERSIONS), seen          # every version served while the others were swapped


def test_versions_only_move_forward_unless_the_server_rolls_back(app_models, expected):
    predictor = Predictor()
    assert predictor.suggest("the king") == [] and predictor.version is None
    assert predictor.install(app_models[3]) == 3
    assert predictor.install(app_models[2]) == 3              # an older model does not win a race
    assert predictor.suggest("the king") == expected[3]["the king"]
    assert predictor.install(app_models[2], allow_older=True) == 2
    assert predictor.suggest("the king") == expected[2]["the king"]


def test_install_latest_picks_the_newest_verifiable_model(app_models, expected, tmp_path):
    import shutil

    for v in (1, 2, 3):
        shutil.copytree(app_models[v].parent, tmp_path / "app" / str(v))
    (tmp_path / "app" / "3" / "app.tflite").write_bytes(b"corrupted")     # fails its sha256
    predictor = Predictor()
    assert predictor.install_latest(tmp_path / "app") == 2
    words = predictor.suggest("the king", k=2)
    assert words == expected[2]["the king"][:2]
    assert all(isinstance(w, str) and 0 < p <= 1 for w, p in words)
    assert Predictor().install_latest(tmp_path / "nothing") is None
