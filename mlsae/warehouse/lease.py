"""Leases in object storage: one writer per autoencoder across machines.

A lease is an object `.leases/<name>.json` holding its owner and expiry. It is taken
with a conditional put (`If-None-Match: *`: only one of two racing writers creates
it), renewed by its holder with `If-Match: <its ETag>` every third of its time to live,
and taken over once expired with `If-Match: <the expired one's ETag>` (again only one
of several waiters wins). A holder killed without releasing blocks others for at most
the time to live (a holder on the same machine that no longer runs, not even that: a
rerun after a kill continues at once). S3 (since 2024), MinIO, R2 and moto's server honour both conditions;
a store that ignores them would let two writers in, so expiry is the only guard there.

Expiry compares no clocks across machines: a waiter counts a lease as expired once the
object has kept one ETag (no renewal) for the holder's time to live, measured on the
waiter's own monotonic clock. The `expires_at` in the object (the holder's wall clock)
only informs `holder()` and log lines; a clock skewed by minutes between machines can
neither let a waiter take a renewed lease nor keep it waiting on a dead one for longer
than the time to live.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mlsae.warehouse.layout import lease_key
from mlsae.warehouse.remote import Store, etag_of, open_store, writer_id

LEASE_SECONDS_ENV = "MLSAE_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 120.0


def lease_seconds() -> float:
    """$MLSAE_LEASE_SECONDS when set (a positive number: an explicit value is never
    replaced by the default), else DEFAULT_LEASE_SECONDS."""
    text = os.environ.get(LEASE_SECONDS_ENV)
    if text is None or not text.strip():
        return DEFAULT_LEASE_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"${LEASE_SECONDS_ENV}={text!r}: give a positive number of seconds "
                         f"(or unset it for {DEFAULT_LEASE_SECONDS:g})")
    return seconds


@dataclass
class Lease:
    """A lease this process holds."""

    store: Store
    """Where the lease object lives."""
    key: str
    """The lease object's key."""
    owner: str
    """host:pid:random, written into the object."""
    etag: str
    """The ETag of our last write: renewals and the release are conditional on it."""
    seconds: float
    """Time to live from each renewal."""
    lost: bool = False
    """A renewal failed: another writer took the lease over (ours had expired)."""

    def body(self) -> bytes:
        return json.dumps({"owner": self.owner, "seconds": self.seconds,
                           "expires_at": time.time() + self.seconds}).encode()

    def renew(self) -> None:
        try:
            written = self.store.fs.pipe_file(self.key, self.body(), IfMatch=self.etag)
            self.etag = etag_of(written)
        except OSError:
            self.lost = True


def _try_take(store: Store, key: str, lease: Lease, seen: dict[str, float]) -> bool:
    """Create the lease object, or take over an expired one; False if someone holds it.
    `seen`: ETag -> when this waiter first saw it (time.monotonic), kept across attempts:
    a lease is expired once one ETag has stood for its time to live."""
    try:
        lease.etag = etag_of(store.fs.pipe_file(key, lease.body(), mode="create"))
        return True
    except FileExistsError:
        pass
    try:
        info = store.fs.info(key, refresh=True)
        current = json.loads(store.fs.cat_file(key))
    except FileNotFoundError:  # released meanwhile: try again at once
        return False
    standing = time.monotonic() - seen.setdefault(etag_of(info), time.monotonic())
    ttl = float(current.get("seconds") or lease.seconds)
    if standing < ttl and not _dead_here(current.get("owner", "")):
        return False
    try:  # expired (or its holder died on this machine): take it over, unless another
        # waiter was first
        lease.etag = etag_of(store.fs.pipe_file(key, lease.body(), IfMatch=etag_of(info)))
        return True
    except OSError:
        return False


def _dead_here(owner: str) -> bool:
    """The holder was a process on this machine that no longer runs (killed): its lease
    need not run out before a rerun here continues."""
    host, _, rest = owner.partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def holder(where: str | os.PathLike, name: str) -> str | None:
    """Who holds the lease `name` now by its holder's clock (None: nobody, or expired by
    that clock); for display: waiters judge expiry by renewals (see the module's doc)."""
    store = open_store(where)
    try:
        current = json.loads(store.fs.cat_file(store.key(lease_key(name))))
    except FileNotFoundError:
        return None
    return current["owner"] if current.get("expires_at", 0) > time.time() else None


@contextlib.contextmanager
def holding(where: str | os.PathLike, name: str, *, seconds: float | None = None,
            poll_seconds: float = 0.5, log: Callable[[str], None] | None = None
            ) -> Iterator[Lease]:
    """Hold the lease `name` of the warehouse at URL `where` for the block: wait while
    another process holds it (until it releases it or it expires), renew it in a
    background thread, release it at the end."""
    store = open_store(where)
    key = store.key(lease_key(name))
    lease = Lease(store, key, f"{writer_id()}:{uuid.uuid4().hex[:8]}", "",
                  seconds or lease_seconds())
    waited, seen = False, {}
    while not _try_take(store, key, lease, seen):
        if not waited and log is not None:
            log(f"{name}: another worker holds it ({holder(where, name) or 'expiring'}); "
                f"waiting (at most {lease.seconds:.0f} s after it stops renewing)")
        waited = True
        time.sleep(poll_seconds)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease.seconds / 3):
            lease.renew()

    thread = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            if not lease.lost and etag_of(store.fs.info(key, refresh=True)) == lease.etag:
                store.fs.rm_file(key)
