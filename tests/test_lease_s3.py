"""Leases judge expiry without comparing clocks across machines (mlsae.warehouse.lease),
against a real S3-compatible server (moto's, on a free loopback port): a holder on another
machine whose clock runs far ahead, and one whose clock runs far behind, are simulated by
writing the lease object as that holder would."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.s3_server import moto_s3

pytestmark = pytest.mark.timeout(120)

BUCKET = "mlsae-leases"
TTL = 1.0


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with moto_s3(tmp_path_factory, BUCKET, scratch=False):
        yield f"s3://{BUCKET}/wh"


def _foreign_write(url: str, name: str, clock_offset: float) -> None:
    """Write the lease object as a holder on another host whose wall clock is off by
    `clock_offset` seconds would (each write a renewal: new content, new ETag)."""
    from mlsae.warehouse.layout import lease_key
    from mlsae.warehouse.remote import open_store

    store = open_store(url)
    body = {"owner": "another-host:1:abcd", "seconds": TTL,
            "expires_at": time.time() + clock_offset + TTL}
    store.fs.pipe_file(store.key(lease_key(name)), json.dumps(body).encode())


def _wait_in_thread(url: str, name: str) -> tuple[threading.Thread, threading.Event]:
    from mlsae.warehouse.lease import holding

    entered = threading.Event()

    def wait() -> None:
        with holding(url, name, seconds=TTL, poll_seconds=0.05):
            entered.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, entered


def test_a_dead_holder_whose_clock_runs_ahead_blocks_for_one_time_to_live_only(url):
    # its expires_at lies a day ahead: a wall-clock rule would wait a day
    _foreign_write(url, "ahead", clock_offset=86_400)
    start = time.monotonic()
    thread, entered = _wait_in_thread(url, "ahead")
    assert entered.wait(20), "the waiter never took over a lease nobody renews"
    waited = time.monotonic() - start
    assert TTL <= waited < TTL + 10, waited
    thread.join(10)


def test_a_renewing_holder_whose_clock_runs_behind_keeps_its_lease(url):
    # its expires_at lies a day behind: a wall-clock rule would take it over at once
    _foreign_write(url, "behind", clock_offset=-86_400)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(TTL / 4):
            _foreign_write(url, "behind", clock_offset=-86_400)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    thread, entered = _wait_in_thread(url, "behind")
    try:
        assert not entered.wait(4 * TTL), "the waiter took a lease its holder kept renewing"
    finally:
        stop.set()
        renewer.join()
    stopped = time.monotonic()
    assert entered.wait(20), "the waiter never took the lease once renewals stopped"
    # the last renewal came up to TTL / 4 before `stopped`: expiry counts from it
    assert time.monotonic() - stopped >= TTL * 0.5
    thread.join(10)
