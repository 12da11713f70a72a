"""The public corpus and vocabulary: parsing on a checked-in fixture, free slots for discovered words,
and no user text in the vocabulary or the pretraining data."""
from __future__ import annotations

import random
import string
from pathlib import Path

import numpy as np
import pytest

from contract.model.text import FREE_SLOT, OOV_ID, SPECIAL_TOKENS, Vocabulary, to_sequences
from models import corpus as corpus_module
from models import public_corpus
from models.corpus import CorpusError, default_data_dir, load_corpus
from models.plays import Speech
from models.public_corpus import oov_rate, parse_verses, public_vocabulary

FIXTURE = Path(__file__).parent / "fixtures" / "kjv_sample.txt"


def test_verses_are_parsed_without_their_references():
    verses = parse_verses(FIXTURE.read_text())
    assert len(verses) == 7
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[5].startswith("And now abideth faith")            # "1Co13:13": a numbered book
    with pytest.raises(CorpusError, match="not a verse line"):
        parse_verses("Ge1:1 In the beginning\nsomething else entirely\n")


def test_the_public_vocabulary_ranks_public_words_and_keeps_free_slots_last():
    vocab = public_vocabulary(parse_verses(FIXTURE.read_text()), size=12, reserved=3)
    assert tuple(vocab.tokens[:4]) == SPECIAL_TOKENS
    assert vocab.tokens[4:7] == ["the", "and", "of"]                  # by frequency in the fixture
    assert len(vocab) == 16 and vocab.free_slots == [13, 14, 15]
    assert all(vocab.tokens[i].startswith(FREE_SLOT) for i in vocab.free_slots)
    ids = to_sequences(["<free:0> free:1 <FREE:2>"], vocab, 8)
    assert not set(ids.ravel()) & set(vocab.free_slots) and OOV_ID in ids   # no text encodes to a free slot
    grown = vocab.with_words(["thou", "thee"])
    assert grown.id("thou") == 13 and grown.id("thee") == 14 and grown.free_slots == [15]
    assert grown.tokens[:13] == vocab.tokens[:13]                      # every other id is kept
    for bad in (["the"], ["two words"], ["x", "x"], ["a", "b", "c", "d"]):
        with pytest.raises(ValueError):
            vocab.with_words(bad)


def test_oov_rate_counts_words_outside_the_vocabulary():
    vocab = Vocabulary.build(["the cat sat"], size=3)
    assert oov_rate(["The cat ran. The dog sat!"], vocab) == pytest.approx(2 / 6)


def scrambled(parse):
    """parse_texts with every speech's text replaced by random letters (same roles, same counts)."""
    rng = random.Random(7)

    def parse_texts(texts):
        return [Speech(s.work, s.role, " ".join("".join(rng.choices(string.ascii_lowercase, k=7))
                                                for _ in range(12)) + ".") for s in parse(texts)]
    return parse_texts


@pytest.mark.corpus
def test_no_user_text_goes_into_the_vocabulary_or_the_pretraining_data(tmp_path, monkeypatch):
    """The users' texts replaced by random strings: the same vocabulary and the same public windows."""
    data = default_data_dir()
    for name in (corpus_module.TARBALL_NAME, public_corpus.TEXT_NAME):
        (tmp_path / name).symlink_to(data / name)
    real = load_corpus(data_dir=tmp_path, vocab_size=1000)
    monkeypatch.setattr(corpus_module, "parse_texts", scrambled(corpus_module.parse_texts))
    for stale in tmp_path.glob("corpus-*"):
        stale.unlink()                                 # the processed cache would hold the real texts
    fake = load_corpus(data_dir=tmp_path, vocab_size=1000)
    assert fake.train_texts != real.train_texts        # the users' text did change ...
    assert fake.vocab == real.vocab                    # ... and the vocabulary did not
    assert len(real.vocab.free_slots) == 100
    verses = public_corpus.load_verses(tmp_path)
    np.testing.assert_array_equal(to_sequences(verses, fake.vocab, 20), to_sequences(verses, real.vocab, 20))
    users = load_corpus(data_dir=tmp_path, vocab_size=1000, vocabulary="users")
    assert users.vocab != fake.vocab                   # the comparison vocabulary is the users' (random) words


@pytest.mark.corpus
def test_the_public_text_is_pinned_and_a_tampered_copy_is_fetched_again(tmp_path):
    data = default_data_dir()
    for name in public_corpus.DEBS:                   # printed again from the cached packages: no network
        (tmp_path / name).symlink_to(data / name)
    copy = tmp_path / public_corpus.TEXT_NAME
    copy.write_bytes((data / public_corpus.TEXT_NAME).read_bytes()[:-10] + b"tampered\n\n")
    assert public_corpus.fetch_text(tmp_path) == copy
    assert corpus_module.sha256_file(copy) == public_corpus.TEXT_SHA256
    assert len(public_corpus.load_verses(tmp_path)) == public_corpus.EXPECTED_VERSES


def test_an_unreachable_archive_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(public_corpus, "ARCHIVE", "http://127.0.0.1:9/debian")
    with pytest.raises(CorpusError, match="could not download the public corpus.*Debian archive"):
        public_corpus.fetch_text(tmp_path)
    assert not list(tmp_path.iterdir())
