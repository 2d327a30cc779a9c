"""A local mirror of a warehouse kept in object storage, for reading it.

Querying Parquet through Python's fsspec bridge costs a round trip per file footer
and per view binding (2.4-10x a local warehouse, benchmarks/bench_s3_read.py). So the
tables (and the marker) are copied to a local directory once and kept in step: each
sync lists the prefix (one request per 1,000 objects) and downloads only the files
whose size or ETag changed since the last sync, then deletes local files that left
the bucket. Queries then run on local files, in the same read-only sandbox as a
local warehouse. Each file is written to a temporary name and renamed, and a lock
serialises syncs of one mirror, so concurrent readers never see a half-written file.

A warehouse that mlsae wrote to the bucket has commit objects (remote.py): then only
files of committed units whose objects still carry the committed size and ETag are
taken (an interrupted upload's debris never is; a unit being overwritten keeps its
previous mirrored files until its new commit). A warehouse copied without mlsae (no
`.commits/`, e.g. `aws s3 sync`) is taken file by file.

Where: $MLSAE_MIRROR_DIR/<hash of the URL>, else ~/.cache/mlsae/mirror/<hash>.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mlsae.warehouse.layout import COMMITS_DIR, SETUP_SQL, WAREHOUSE_MARKER, warehouse_location
from mlsae.warehouse.remote import Commit, is_intact
from mlsae.warehouse.tables import TABLES

STATE = ".mirror.json"


def mirror_dir(url: str) -> Path:
    base = os.environ.get("MLSAE_MIRROR_DIR") or Path.home() / ".cache" / "mlsae" / "mirror"
    return Path(base) / hashlib.sha1(str(url).rstrip("/").encode()).hexdigest()[:16]


def _version(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten: size and ETag (or mtime elsewhere)."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{tag}"


@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wanted(relative: str) -> bool:
    """The table files, the marker and setup.sql: what the views read (not the caches,
    autoencoders or figures, which queries never touch)."""
    first = relative.split("/", 1)[0]
    return (first in TABLES and relative.endswith(".parquet")
            and not relative.rsplit("/", 1)[-1].startswith(".")) \
        or relative in (WAREHOUSE_MARKER, SETUP_SQL)


def _committed(fs: Any, prefix: str, everything: dict[str, dict], listing: dict[str, dict],
               state: dict[str, Any]) -> tuple[dict[str, dict], set[str]]:
    """(the files of intact committed units, the files of units being overwritten, which
    keep their mirrored version). Commit objects are read again only when their ETag
    changed (cached in the state as 'commit:<key>')."""
    commits = []
    for rel, info in everything.items():
        if not (rel.startswith(COMMITS_DIR + "/") and rel.endswith(".json")):
            continue
        cached = state.get(f"commit:{rel}")
        if cached is None or cached[0] != _version(info):
            try:
                cached = [_version(info), fs.cat_file(f"{prefix}/{rel}").decode()]
            except FileNotFoundError:
                # listed, then gone: another worker is rewriting this commit right now (a
                # store may drop the key for the moment of the overwrite); keep what this
                # mirror had of the unit, and take the new commit at the next sync
                if cached is None:
                    continue
            else:
                state[f"commit:{rel}"] = cached
        commits.append(Commit.from_json(cached[1]))
    visible, keep = {}, set()
    for commit in commits:
        wanted = [rel for rel in commit.files if _wanted(rel)]
        if is_intact(commit, everything):
            visible.update({rel: listing[rel] for rel in wanted})
        else:
            keep.update(wanted)
    return visible, keep


def local_mirror(url: Any) -> Path:
    """Sync the local mirror of the warehouse at `url` and return its directory."""
    remote = warehouse_location(url)
    fs, prefix = remote.fs, remote.path.rstrip("/")
    target = mirror_dir(str(url))
    with _locked(target):
        state_path = target / STATE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        fs.invalidate_cache(prefix)
        everything = {name[len(prefix) + 1:]: info
                      for name, info in fs.find(prefix, detail=True).items()}
        listing = {rel: info for rel, info in everything.items() if _wanted(rel)}
        if any(rel.startswith(COMMITS_DIR + "/") for rel in everything):
            listing, keep = _committed(fs, prefix, everything, listing, state)
        else:
            keep = set()
        for rel, info in listing.items():
            version = _version(info)
            local = target / rel
            if state.get(rel) == version and local.exists():
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            temp = local.with_name(f".{local.name}.download")
            fs.get_file(f"{prefix}/{rel}", str(temp))
            os.replace(temp, local)
            state[rel] = version
        for rel in sorted(set(state) - set(listing) - keep):  # gone from the bucket
            if rel.startswith("commit:"):
                continue
            gone = target / rel
            gone.unlink(missing_ok=True)
            del state[rel]
            # an emptied partition directory would still name its sae_id
            for parent in gone.parents:
                if parent == target or any(parent.iterdir()):
                    break
                parent.rmdir()
        temp_state = target / f".{STATE}.tmp"
        temp_state.write_text(json.dumps(state, sort_keys=True))
        os.replace(temp_state, state_path)
    return target
