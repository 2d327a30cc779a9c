"""A warehouse in object storage, written through a local working copy: publish its finished
units to the bucket, pull them back on another worker, clean what an interrupted upload left.

Object stores have no rename, so a file cannot appear atomically the way the local
writer's temp-file-and-rename makes it appear. Instead files are grouped in units
(layout.publish_unit: a logged part's five files, an autoencoder's weights, any other
file alone) and a unit becomes visible only when its commit object
(`.commits/<unit>.json`, written after every data object of the unit) exists and lists
each object's size and ETag. Readers (mirror.py, pull) take only committed units whose
objects still carry the listed ETags, so:

- a kill mid-upload leaves data objects without a commit: ignored by readers, overwritten
  by the rerun (the same keys: nothing is duplicated) and deleted by clean_debris;
- republishing an unchanged unit uploads nothing (the commit's md5s match the local
  files), so reruns are idempotent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlsae.warehouse.layout import (
    AUTOENCODERS_DIR,
    COMMITS_DIR,
    PUBLISH_STATE,
    TEMP_DIR,
    TRAINED_WEIGHTS_DIR,
    commit_key,
    is_url,
    publish_order,
    publish_unit,
    sae_prefixes,
    trained_weights_dir,
    unit_complete,
    unit_sae_id,
    warehouse_location,
    working_dir,
)

PUBLISH_DELAY_ENV = "MLSAE_PUBLISH_DELAY_S"
"""Seconds to wait after each uploaded data object (tests kill a process mid-upload)."""


@dataclass(frozen=True)
class ObjectVersion:
    """One uploaded file as its commit records it."""

    size: int
    """Bytes of the object."""
    etag: str
    """The store's ETag of the object as uploaded: a reader takes the object only if its
    ETag is still this one (a later overwrite in progress is not mixed in)."""
    md5: str
    """Hex md5 of the local file: what the publisher compares before uploading again."""


@dataclass(frozen=True)
class Commit:
    """The object that makes a unit's files visible."""

    unit: str
    """The unit's name (layout.publish_unit)."""
    files: dict[str, ObjectVersion]
    """Every file of the unit, relative to the warehouse, and its uploaded version."""
    written_at: float
    """Unix time the commit was written (for people reading the bucket)."""
    writer: str
    """host:pid of the process that wrote it."""

    def to_json(self) -> bytes:
        return json.dumps({"unit": self.unit, "written_at": self.written_at,
                           "writer": self.writer,
                           "files": {k: asdict(v) for k, v in sorted(self.files.items())}},
                          indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Commit:
        raw = json.loads(data)
        return cls(raw["unit"], {k: ObjectVersion(**v) for k, v in raw["files"].items()},
                   raw["written_at"], raw["writer"])


@dataclass(frozen=True)
class Store:
    """A warehouse prefix in object storage and the fsspec filesystem that reaches it."""

    fs: Any
    """The fsspec filesystem (s3fs for s3://, with the standard AWS settings)."""
    prefix: str
    """bucket/prefix, without the scheme or a trailing slash."""

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}"

    def relative(self, key: str) -> str:
        return key[len(self.prefix) + 1:]

    def listing(self, relative_prefix: str = "") -> dict[str, dict[str, Any]]:
        """{relative path: info (size, ETag)} of every object under the prefix."""
        root = self.key(relative_prefix).rstrip("/")
        self.fs.invalidate_cache(root)
        try:
            found = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        return {self.relative(key): info for key, info in found.items()
                if info.get("type", "file") == "file"}


def open_store(where: str | os.PathLike) -> Store:
    location = warehouse_location(where)
    return Store(location.fs, location.path.rstrip("/"))


def etag_of(info: dict[str, Any]) -> str:
    return str(info.get("ETag") or info.get("etag") or "").strip('"')


def writer_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def read_commits(store: Store, wanted=lambda unit: True, under: tuple[str, ...] = ("",)
                 ) -> dict[str, Commit]:
    """The commits of the units `wanted(unit)` accepts, by unit; under: list only the
    commits of units whose names start with one of these (one listing each)."""
    listed = {rel for prefix in under for rel in store.listing(f"{COMMITS_DIR}/{prefix}")}
    keys = [store.key(rel) for rel in sorted(listed)
            if rel.endswith(".json") and wanted(rel[len(COMMITS_DIR) + 1:-len(".json")])]
    if not keys:
        return {}
    commits = {}
    for data in store.fs.cat(keys, on_error="omit").values():  # one concurrent batch
        commit = Commit.from_json(data)
        commits[commit.unit] = commit
    return commits


def is_intact(commit: Commit, listing: dict[str, dict[str, Any]]) -> bool:
    """Every object the commit lists is in the bucket with the listed size and ETag."""
    return all(rel in listing and listing[rel].get("size") == v.size
               and etag_of(listing[rel]) == v.etag for rel, v in commit.files.items())


# --------------------------------------------------------------------------- the working copy

def _md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


@contextlib.contextmanager
def _locked(local: Path) -> Iterator[dict[str, list]]:
    """The working copy's publish state ({relative: [size, mtime_ns, md5]} of the files as
    last published or pulled), under a lock: one publish or pull at a time per copy."""
    state_path = local / PUBLISH_STATE
    state_path.parent.mkdir(parents=True, exist_ok=True)
    with open(state_path.with_name("publish.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        try:
            yield state
        finally:
            temp = state_path.with_name(f".{state_path.name}.{os.getpid()}")
            temp.write_text(json.dumps(state, sort_keys=True))
            os.replace(temp, state_path)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _local_md5(local: Path, rel: str, state: dict[str, list]) -> str:
    """md5 of a working-copy file, from the state when its size and mtime are unchanged."""
    stat = (local / rel).stat()
    known = state.get(rel)
    if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
        return known[2]
    return _md5(local / rel)


def _record(local: Path, rel: str, md5: str, state: dict[str, list]) -> None:
    stat = (local / rel).stat()
    state[rel] = [stat.st_size, stat.st_mtime_ns, md5]


def _unchanged_since_sync(local: Path, rel: str, state: dict[str, list]) -> bool:
    """The local file is as it was last published or pulled (no unpublished work in it)."""
    path = local / rel
    if not path.exists():
        return True
    stat, known = path.stat(), state.get(rel)
    return bool(known) and known[0] == stat.st_size and known[1] == stat.st_mtime_ns


def _belongs(unit: str, sae_ids: set[str], shared: bool) -> bool:
    owner = unit_sae_id(unit)
    return owner in sae_ids if owner is not None else shared


def local_units(local: Path, prefix: str = "", caches: bool = False) -> dict[str, list[str]]:
    """{unit: its files relative to the working copy} of every publishable file (under the
    directory `prefix`, e.g. "activations/<key>/"; caches: layout.publish_unit's)."""
    units: dict[str, list[str]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(local / prefix):
        rel_dir = Path(dirpath).relative_to(local).as_posix()
        if rel_dir == ".":
            rel_dir = ""
        dirnames[:] = [d for d in dirnames if caches or publish_unit(f"{rel_dir}/{d}/x".lstrip("/"))]
        for name in filenames:
            rel = f"{rel_dir}/{name}".lstrip("/")
            unit = publish_unit(rel, caches)
            if unit is not None:
                units[unit].append(rel)
    return dict(units)


def publish(where: str | os.PathLike, sae_ids: Iterable[str] = (), *, shared: bool = True,
            prefix: str = "", caches: bool = False, log=None) -> list[str]:
    """Upload the finished units of the working copy that the bucket lacks or holds in
    another version: those of `sae_ids`, and (shared=True) the files of no autoencoder
    (figures, lenses, setup.sql, the marker). Each unit's data objects first, then its
    commit. prefix: only the files under this directory (relative to the warehouse);
    caches: the activation caches' files too (layout.publish_unit; a shared cache is
    published with prefix="activations/<key>/"). Returns the units committed."""
    local, store, ids = working_dir(where), open_store(where), set(sae_ids)
    delay = float(os.environ.get(PUBLISH_DELAY_ENV) or 0)
    committed = []
    with _locked(local) as state:
        units = {u: sorted(rels) for u, rels in local_units(local, prefix, caches).items()
                 if _belongs(u, ids, shared) and unit_complete(u, rels)}
        if not units:
            return []
        remote = read_commits(store, lambda unit: unit in units, under=(prefix,))
        for unit, rels in sorted(units.items(), key=lambda item: publish_order(item[0])):
            md5s = {rel: _local_md5(local, rel, state) for rel in rels}
            old = remote.get(unit)
            if old is not None and set(old.files) == set(rels) \
                    and all(old.files[rel].md5 == md5s[rel] for rel in rels):
                for rel in rels:
                    _record(local, rel, md5s[rel], state)
                continue
            versions = {}
            for rel in rels:
                key = store.key(rel)
                store.fs.put_file(str(local / rel), key)
                info = store.fs.info(key)
                versions[rel] = ObjectVersion(int(info["size"]), etag_of(info), md5s[rel])
                if delay:
                    time.sleep(delay)
            commit = Commit(unit, versions, time.time(), writer_id())
            store.fs.pipe_file(store.key(commit_key(unit)), commit.to_json())
            for rel in rels:
                _record(local, rel, md5s[rel], state)
            committed.append(unit)
    if log and committed:
        log(f"published {len(committed)} unit(s) to {where}")
    return committed


def pull(where: str | os.PathLike, sae_ids: Iterable[str] = (), *,
         shared_prefixes: tuple[str, ...] = (), sae_prefix: str = "") -> list[str]:
    """Download the committed units of `sae_ids` (and the shared units under
    `shared_prefixes`, e.g. lenses/) into the working copy, so a step on this worker finds
    what another worker finished or checkpointed; sae_prefix: only their units whose name
    starts with it (e.g. "autoencoders/": the weights, not the tables). A local file
    changed since it was last published or pulled is unpublished work and is kept.
    Returns the units pulled."""
    local, store, ids = working_dir(where), open_store(where), set(sae_ids)

    def wanted(unit: str) -> bool:
        owner = unit_sae_id(unit)
        if owner is not None:
            return owner in ids and unit.startswith(sae_prefix)
        return unit.startswith(shared_prefixes)

    pulled = []
    with _locked(local) as state:
        # only shared prefixes wanted: list only their commits
        commits = read_commits(store, wanted, under=shared_prefixes if shared_prefixes and not ids
                               else ("",))
        for unit, commit in sorted(commits.items()):
            todo = [rel for rel, v in commit.files.items()
                    if not ((local / rel).exists() and _local_md5(local, rel, state) == v.md5)]
            if not todo or not all(_unchanged_since_sync(local, rel, state) for rel in todo):
                continue
            temps = {}
            for rel in todo:
                temp = local / TEMP_DIR / "pull" / rel
                temp.parent.mkdir(parents=True, exist_ok=True)
                store.fs.get_file(store.key(rel), str(temp))
                temps[rel] = temp
            if any(_md5(temps[rel]) != commit.files[rel].md5 for rel in todo):
                continue  # being overwritten right now: the next pull takes the new commit
            for rel, temp in temps.items():
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp, local / rel)
                _record(local, rel, commit.files[rel].md5, state)
            pulled.append(unit)
    return pulled


def clean_debris(where: str | os.PathLike, sae_ids: Iterable[str],
                 prefixes: tuple[str, ...] = ()) -> list[str]:
    """Delete the objects of `sae_ids` (and those under `prefixes`, e.g. a shared activation
    cache's) that no commit lists (what an upload killed before its commit left). Only call
    it holding those autoencoders' (that cache's) leases: another writer's upload in
    progress would look the same."""
    store, ids = open_store(where), set(sae_ids)
    commits = read_commits(store, lambda unit: unit_sae_id(unit) in ids
                           or (bool(prefixes) and unit.startswith(prefixes)))
    listed = {rel for commit in commits.values() for rel in commit.files}
    every = [prefix for sae_id in sorted(ids) for prefix in sae_prefixes(sae_id)] + list(prefixes)
    debris = [rel for prefix in every for rel in store.listing(prefix) if rel not in listed]
    if debris:
        store.fs.rm([store.key(rel) for rel in debris])
    return debris


def committed_files(where: str | os.PathLike) -> list[str]:
    """Every file of the warehouse at URL `where` that readers take, relative to it: the
    files of intact committed units (one listing and the commit objects; no data is
    read), or every file of a warehouse copied without mlsae (no commits)."""
    store = open_store(where)
    listing = store.listing()
    if not any(rel.startswith(COMMITS_DIR + "/") for rel in listing):
        return sorted(listing)
    return sorted(rel for commit in read_commits(store).values() if is_intact(commit, listing)
                  for rel in commit.files)


def is_committed(where: str | os.PathLike, relative: str) -> bool:
    """Whether the file `relative` (to the warehouse at URL `where`) is visible: listed by
    the commit of its unit, with the object still carrying the committed size and ETag (an
    upload killed before its commit is not)."""
    unit = publish_unit(relative, caches=True)
    if unit is None:
        return False
    store = open_store(where)
    commit = read_commits(store, lambda name: name == unit).get(unit)
    if commit is None or relative not in commit.files:
        return False
    # a unit may span directories (a logged part has a file in each of five tables)
    folders = {rel.rsplit("/", 1)[0] + "/" for rel in commit.files}
    listing = {rel: info for folder in folders for rel, info in store.listing(folder).items()}
    return is_intact(commit, listing)


def download(where: str | os.PathLike, relative_prefix: str, target: str | os.PathLike
             ) -> list[Path]:
    """Copy the committed files under `relative_prefix` (e.g. layout.report_prefix) of the
    warehouse at URL `where` into the local directory `target`, keeping their paths below
    the prefix. Returns the files written."""
    store, target = open_store(where), Path(target)
    prefix = relative_prefix.rstrip("/") + "/"
    listing = store.listing(prefix)
    units = {publish_unit(rel) for rel in listing}
    written = []
    for commit in read_commits(store, lambda unit: unit in units).values():
        if not is_intact(commit, listing):
            continue
        for rel in sorted(commit.files):
            if not rel.startswith(prefix):
                continue
            local = target / rel[len(prefix):]
            local.parent.mkdir(parents=True, exist_ok=True)
            store.fs.get_file(store.key(rel), str(local))
            written.append(local)
    return written


def trained_autoencoders(where: str | os.PathLike, sae_ids: Iterable[str]) -> set[str]:
    """Those of `sae_ids` whose training has finished in the warehouse: their weights are
    saved (for a URL: committed in the bucket). What a cost estimate need not count again."""
    ids = set(sae_ids)
    if not is_url(where):
        return {i for i in ids if (trained_weights_dir(where, i) / "config.json").exists()}
    units = {f"{AUTOENCODERS_DIR}/{i}/{TRAINED_WEIGHTS_DIR}": i for i in ids}
    return {units[unit] for unit in read_commits(open_store(where), lambda u: u in units)}
