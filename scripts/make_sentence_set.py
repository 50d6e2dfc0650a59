"""Build the sentence set used to measure embedding fidelity (src/lowbit/data/text/sentences.txt).

Three registers of English, so that fidelity is not measured on one kind of text only:
  * narrative/archaic: King James Bible verses (public domain), via Debian's ``bible-kjv``
    package (``apt-get install bible-kjv``), sampled across books;
  * technical/modern: first sentences of docstrings in the Python standard library (PSF licence);
  * dramatic dialogue: sentences from lowbit's held-out Shakespeare split (public domain), which
    the reference LM never trained on.
Deterministic under --seed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import subprocess
from pathlib import Path

BOOKS = [
    "Gen",
    "Exo",
    "Num",
    "Deu",
    "Jos",
    "Jdg",
    "Rut",
    "1Sa",
    "2Sa",
    "1Ki",
    "2Ki",
    "Job",
    "Psa",
    "Pro",
    "Ecc",
    "Isa",
    "Jer",
    "Eze",
    "Dan",
    "Jon",
    "Mat",
    "Mar",
    "Luk",
    "Joh",
    "Act",
    "Rom",
    "1Co",
    "Gal",
    "Eph",
    "Heb",
    "Jam",
    "Rev",
]
STDLIB = [
    "os",
    "os.path",
    "json",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "re",
    "string",
    "textwrap",
    "datetime",
    "random",
    "statistics",
    "shutil",
    "subprocess",
    "threading",
    "argparse",
    "csv",
    "logging",
    "unittest",
    "email",
    "http.client",
    "urllib.parse",
    "zipfile",
    "tarfile",
    "gzip",
    "hashlib",
    "heapq",
    "bisect",
    "decimal",
    "fractions",
    "fnmatch",
    "glob",
    "tempfile",
    "socket",
    "sqlite3",
    "calendar",
    "copy",
    "pprint",
    "inspect",
    "ast",
    "tokenize",
    "difflib",
    "contextlib",
    "dataclasses",
    "enum",
    "typing",
    "queue",
    "sched",
    "selectors",
    "signal",
    "struct",
    "codecs",
    "locale",
    "gettext",
    "uuid",
    "ipaddress",
    "mimetypes",
]
WORDS = re.compile(r"[A-Za-z]")


def good(sentence: str, lo: int = 6, hi: int = 40) -> bool:
    n = len(sentence.split())
    return lo <= n <= hi and WORDS.search(sentence) is not None and ">>>" not in sentence


def kjv(rng: random.Random, n: int) -> list[str]:
    out = []
    per_book = n // len(BOOKS) + 1
    for book in BOOKS:
        chapter = rng.randint(1, 4)
        text = subprocess.run(
            ["bible", "-f", f"{book}{chapter}:1-30"], capture_output=True, text=True, check=True
        ).stdout
        verses = [line.split(" ", 1)[1].strip() for line in text.splitlines() if " " in line and line[:1].isalnum()]
        verses = [v for v in verses if good(v)]
        out.extend(rng.sample(verses, min(per_book, len(verses))))
    return out[:n]


def docstrings(rng: random.Random, n: int) -> list[str]:
    found = []
    for name in STDLIB:
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.isclass(obj) else None
            if not doc:
                continue
            first = " ".join(doc.split("\n\n")[0].split())
            first = re.split(r"(?<=[.!?])\s", first)[0]
            if good(first) and first.endswith("."):
                found.append(first)
    found = sorted(set(found))
    return rng.sample(found, n)


def shakespeare(path: Path, rng: random.Random, n: int) -> list[str]:
    text = " ".join(path.read_text().split())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    sentences = [s for s in sentences if good(s, 6, 30) and not s.isupper() and "[" not in s]
    return rng.sample(sorted(set(sentences)), n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="src/lowbit/data/text/sentences.txt")
    p.add_argument("--heldout", default="src/lowbit/data/text/heldout.txt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    sentences = kjv(rng, 200) + docstrings(rng, 200) + shakespeare(Path(args.heldout), rng, 160)
    seen, unique = set(), []
    for s in sentences:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    Path(args.out).write_text("\n".join(unique) + "\n")
    print(f"wrote {len(unique)} sentences to {args.out}")


if __name__ == "__main__":
    main()
