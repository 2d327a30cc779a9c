"""How a command runs a flow: a Prefect server to talk to, Ctrl-C, and one-line errors.

- Without a configured server (PREFECT_API_URL) the command starts its own
  temporary `prefect server start` on a free loopback port, in its own process
  session, so the terminal's Ctrl-C (sent to the whole foreground process
  group) does not kill it under the running flow; it is stopped when the
  command ends.
- The first Ctrl-C asks every step to stop at its next safe point (training
  writes its checkpoints first): the command ends within seconds with
  "interrupted: run the same command again ..."; a second Ctrl-C quits at once.
- Every failure ends with one `Error:` line naming the cause.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

import click

_SERVER = None  # the temporary server, stopped by a second Ctrl-C before quitting


def prefect_defaults() -> None:
    """Offline-friendly Prefect settings (ENV.md), unless the user set them."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def prefect_session() -> Iterator[None]:
    """The configured Prefect server, or a temporary one shielded from the terminal's signals."""
    global _SERVER
    prefect_defaults()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from flows.server import PrefectServer

    workdir = tempfile.mkdtemp(prefix="mlsae-prefect-")
    click.echo("Starting a temporary Prefect server (set PREFECT_API_URL to use your own)...",
               err=True)
    server = PrefectServer(workdir, own_home=False, startup_timeout_s=120)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as err:
        shutil.rmtree(workdir, ignore_errors=True)
        raise click.ClickException(f"the temporary Prefect server did not start: {err}") from err
    _SERVER = server
    previous_env = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url  # for subprocesses and new settings
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}), \
                _global_settings():
            yield
    finally:
        if previous_env is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous_env
        _SERVER = None
        _drain_prefect_clients()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _global_settings() -> Iterator[None]:
    """Make the server visible to threads that did not copy this context (Prefect's own
    workers): without it, a task thread found no API URL and started Prefect's ephemeral
    server beside ours. Prefect's test harness does the same (an internal of 3.8; skipped
    if it is gone)."""
    import prefect.context

    replace = getattr(prefect.context, "_temporary_global_settings_context", None)
    if replace is None:
        yield
        return
    with replace(prefect.context.get_settings_context()):
        yield


def _drain_prefect_clients(timeout_s: float = 10.0) -> None:
    """Send Prefect's queued logs and events while the server is still up; otherwise its
    background workers retry a stopped server and keep the process alive at exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def ctrl_c_stops_at_a_safe_point() -> Iterator[None]:
    """First SIGINT: request a stop at the next step boundary; second: quit now."""
    from mlsae import interrupt

    interrupt.clear()

    def handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        if interrupt.stop_requested():
            click.echo("\nError: interrupted again: quitting now (finished steps are kept; "
                       f"{interrupt.RERUN_HINT})", err=True)
            if _SERVER is not None:
                _SERVER.stop()
            os._exit(130)
        interrupt.request_stop()
        _quiet_console_logs()
        click.echo("\nCtrl-C: stopping at the next step boundary (training writes its "
                   "checkpoint first); Ctrl-C again to quit at once.", err=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _quiet_console_logs() -> None:
    """After Ctrl-C, the steps that stop fail by design: keep their tracebacks out of the
    terminal (they still reach the server's log) so the run ends with one line."""
    import logging

    for name in list(logging.root.manager.loggerDict) + [""]:
        if name == "" or name.startswith("prefect"):
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(
                        handler, logging.FileHandler):
                    handler.setLevel(logging.CRITICAL + 1)


def describe_failure(err: BaseException) -> str:
    """One line naming the cause of a failed run (the innermost exception's message)."""
    cause = err
    while cause.__cause__ is not None and not str(cause):
        cause = cause.__cause__
    text = str(cause).strip() or type(cause).__name__
    first = text.splitlines()[0] if "invalid parameters" not in text else text
    return f"{type(cause).__name__}: {first}" if type(cause).__name__ not in first else first


def call_flow(flow_fn, **params):
    """Run a flow for a command (in a Prefect session, Ctrl-C safe); every failure becomes
    a one-line error (the flow's steps are cached, so rerunning continues)."""
    from mlsae import interrupt
    from mlsae.plan import InvalidRequest

    with ctrl_c_stops_at_a_safe_point(), prefect_session():
        try:
            return flow_fn(**params)
        except interrupt.Interrupted as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:
            raise click.ClickException(f"interrupted: {interrupt.RERUN_HINT}") from None
        except InvalidRequest as err:
            raise click.ClickException(str(err)) from None
        except Exception as err:
            if interrupt.stop_requested():
                raise click.ClickException(f"interrupted: {interrupt.RERUN_HINT}") from None
            raise click.ClickException(
                f"{describe_failure(err)}\n(the run's log above has the details; after a fix, "
                f"{interrupt.RERUN_HINT})") from None


def fail_fast(fn, *args, **kwargs):
    """Call a planning or estimating function; a bad request (InvalidRequest, or a model,
    data or file problem the library reports as ValueError/OSError) is one Error: line."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None


