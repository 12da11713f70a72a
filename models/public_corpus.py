"""The public corpus: the King James Bible (1611), text no user of the keyboard typed.

Why this text: the vocabulary and the pretrained model must come from text
that is public and disjoint from every user's. The package index this
project installs from serves no source distribution that ships a body of
public-domain English prose (NLTK's corpora, for one, are a separate
download from GitHub). Debian's archive ships the 1611 King James text:
from the same era as the plays (1590–1613), about 820,000 words, public
domain. Two packages hold it: `bible-kjv-text` (the verses, compressed in
the format of the `bible` program) and `bible-kjv` (that program).

Fetching needs no root and no apt: both .debs are downloaded from the
Debian archive by their pool path, pinned by sha256, unpacked here (a .deb
is an `ar` archive holding `data.tar.xz`), and the program prints every
verse once (`bible -f gen1:1-rev22:21`). The printed text is pinned by
sha256 too and cached as `kjv.txt` in the data directory beside the two
.debs, so later runs touch neither the network nor the program. Where the bundled amd64
program cannot run, an installed `bible` (`apt install bible-kjv`) is used.
"""
from __future__ import annotations

import io
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from contract.model.text import OOV_ID, Vocabulary, split_sentences, words
from models.data_dir import CorpusError, default_data_dir, sha256_file

ARCHIVE = os.environ.get("NIGHTJAR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
POOL = "pool/main/b/bible-kjv"
DEBS = {  # Debian 12 (bookworm), bible-kjv 4.38
    "bible-kjv-text_4.38_all.deb": "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    "bible-kjv_4.38_amd64.deb": "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
}
TEXT_NAME = "kjv.txt"
TEXT_SHA256 = "cd45f0c9cedab8e4439bd6486c8952c77cc8b0ecc5d1f6ae3513f2039f47229d"
EXPECTED_VERSES = 31_102
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def text_path(data_dir: str | Path | None = None) -> Path:
    return Path(data_dir or default_data_dir()) / TEXT_NAME


def fetch_text(data_dir: str | Path | None = None) -> Path:
    """The verified public text in `data_dir`, fetched and printed once (module docstring)."""
    dest = text_path(data_dir)
    if dest.is_file() and sha256_file(dest) == TEXT_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        root = Path(tmp)
        for name, sha in DEBS.items():
            _unpack_deb(_deb(dest.parent / name, sha), root)
        text = _print_verses(root)
        printed = root / TEXT_NAME
        printed.write_bytes(text)
        got = sha256_file(printed)
        if got != TEXT_SHA256:
            raise CorpusError(f"the public text printed by `bible` has sha256 {got}, expected {TEXT_SHA256}")
        os.replace(printed, dest)
    return dest


def _deb(cached: Path, sha256: str) -> bytes:
    """The package, from the data directory if a verified copy is there, else from the archive."""
    if cached.is_file() and sha256_file(cached) == sha256:
        return cached.read_bytes()
    data = _download(f"{ARCHIVE}/{POOL}/{cached.name}", sha256)
    tmp = cached.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    return data


def _download(url: str, sha256: str) -> bytes:
    import hashlib

    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise CorpusError(f"could not download the public corpus from {url} ({e}); this machine must reach "
                          "the Debian archive once (set NIGHTJAR_DEBIAN_MIRROR for another mirror)") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise CorpusError(f"sha256 mismatch for {url}: expected {sha256}, got {got}; nothing was kept")
    return data


def _unpack_deb(deb: bytes, root: Path) -> None:
    """Extract a .deb's data.tar.* into `root` (a .deb is an ar archive: a magic, then members with
    60-byte headers, each padded to an even length)."""
    if not deb.startswith(b"!<arch>\n"):
        raise CorpusError("a downloaded .deb is not an ar archive")
    pos = 8
    while pos + 60 <= len(deb):
        name, size = deb[pos:pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48:pos + 58].decode().strip())
        body = deb[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("./usr/")]
                tar.extractall(root, members=members, filter="data")
            return
        pos += 60 + size + (size & 1)
    raise CorpusError("a downloaded .deb holds no data.tar")


def _print_verses(root: Path) -> bytes:
    data_dir = root / "usr/lib"
    bundled = root / "usr/bin/bible"
    program = bundled if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") else None
    program = program or (Path(shutil.which("bible")) if shutil.which("bible") else None)
    if program is None:
        raise CorpusError("the public corpus needs the `bible` program: the bundled one is for Linux on "
                          "x86-64; elsewhere install Debian's bible-kjv (apt install bible-kjv)")
    program.chmod(0o755)
    try:
        done = subprocess.run([str(program), "-p", str(data_dir), "-f", "gen1:1-rev22:21"],
                              capture_output=True, timeout=120)
    except OSError as e:
        raise CorpusError(f"could not run {program} ({e}); install Debian's bible-kjv instead") from None
    if done.returncode != 0:
        raise CorpusError(f"{program} failed: {done.stderr.decode(errors='replace')[-500:]}")
    return done.stdout


# -- reading ---------------------------------------------------------------------------------


def parse_verses(text: str) -> list[str]:
    """The verses of the printed text, without their references ("Ge1:1 In the beginning …")."""
    out = []
    for line in text.splitlines():
        m = _VERSE.match(line.strip())
        if m:
            out.append(m.group(4))
        elif line.strip():
            raise CorpusError(f"not a verse line in the public text: {line[:80]!r}")
    return out


def load_verses(data_dir: str | Path | None = None) -> list[str]:
    verses = parse_verses(fetch_text(data_dir).read_text(encoding="utf-8"))
    if len(verses) != EXPECTED_VERSES:
        raise CorpusError(f"the public text has {len(verses)} verses, expected {EXPECTED_VERSES}")
    return verses


def public_vocabulary(verses: Iterable[str], size: int, reserved: int) -> Vocabulary:
    """The specials, the `size - reserved` most frequent public words, and `reserved` free slots."""
    return Vocabulary.build(verses, size, reserved)


def oov_rate(texts: Iterable[str], vocab: Vocabulary) -> float:
    """The fraction of the words of `texts` outside `vocab` (what the `<oov>` token stands for)."""
    total = missing = 0
    for text in texts:
        for sentence in split_sentences(text):
            total += len(sentence)
            missing += sum(1 for w in sentence if vocab.id(w) == OOV_ID)
    return missing / max(total, 1)


def stats(verses: list[str]) -> dict:
    tokens = sum(len(words(v)) for v in verses)
    return {"source": f"Debian bible-kjv 4.38 (King James Version, 1611), sha256 {TEXT_SHA256[:12]}…",
            "verses": len(verses), "tokens": tokens, "distinct_words": len({w for v in verses for w in words(v)})}
