"""A real `prefect server start`, isolated and disposable: the CLI's temporary server
and the integration tests' server.

`PrefectServer` picks a free loopback port, gives the server (and every client
command started through it) its own PREFECT_HOME in a temporary directory (or
the user's, with `home=None`, as the CLI's temporary server does), sets
the settings ENV.md says Prefect 3.8 needs on this kind of machine (telemetry
off, long start-up timeout), waits for /api/health, and on `stop()` kills the
whole process group of the server and of every helper process it started
(workers), so nothing outlives the test.

    with PrefectServer(tmp_path) as server:
        server.run_cli("work-pool", "create", "pool", "--type", "process")
        worker = server.spawn_cli("worker", "start", "--pool", "pool")
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_BIN = Path(sys.executable).with_name("prefect")

# ENV.md: telemetry fails offline and logs an ERROR; a fresh server needs more
# than the default 20 s to become healthy under load.
QUIET_PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL what is left."""
    if proc.poll() is not None:
        # The leader is gone but children may survive in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


class PrefectServer:
    """One `prefect server start` process with its own PREFECT_HOME and port."""

    def __init__(self, workdir: Path, *, ui: bool = False, extra_env: Mapping[str, str] | None = None,
                 startup_timeout_s: float = 120.0, own_home: bool = True):
        self.workdir = Path(workdir)
        self.home = self.workdir / "prefect-home" if own_home else None
        if self.home is not None:
            self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.ui = ui
        self.startup_timeout_s = startup_timeout_s
        self.log_path = self.workdir / "prefect-server.log"
        self.env = self._make_env(extra_env or {})
        self.process: subprocess.Popen | None = None
        self._children: list[tuple[subprocess.Popen, object]] = []

    def _make_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        keep_home = self.home is None
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PREFECT_") or (keep_home and k == "PREFECT_HOME")}
        env.update(QUIET_PREFECT_ENV)
        if self.home is not None:
            env["PREFECT_HOME"] = str(self.home)
        env.update({
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_SERVER_UI_ENABLED": "true" if self.ui else "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Scheduled runs of a cron deployment would start on their own and
            # compete with the runs the test triggers.
            "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            # The repo on the path so `flows`/`tasks` import from workers too.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        })
        env.update(extra)
        return env

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> PrefectServer:
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [str(PREFECT_BIN), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--analytics-off", "--no-ui" if not self.ui else "--ui"],
            env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() kills uvicorn and services too
        )
        self._log_file = log
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                return resp.status == 200 and json.loads(resp.read() or b"false") is True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self) -> None:
        for proc, log in reversed(self._children):
            _kill_group(proc)
            with contextlib.suppress(Exception):
                log.close()
        self._children.clear()
        if self.process is not None:
            _kill_group(self.process)
            self.process = None
        with contextlib.suppress(Exception):
            self._log_file.close()

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- talking to it -------------------------------------------------------------

    def run_cli(self, *args: str, timeout_s: float = 120, cwd: Path | None = None,
                check: bool = True, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `prefect ARGS` against this server; raise with its output on failure."""
        return self.run([str(PREFECT_BIN), *args], timeout_s=timeout_s, cwd=cwd, check=check, env=env)

    def run(self, argv: Sequence[str], *, timeout_s: float = 120, cwd: Path | None = None,
            check: bool = True, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run any command with this server's environment (PREFECT_API_URL, PREFECT_HOME...)."""
        result = subprocess.run(
            list(argv), env={**self.env, **(env or {})}, cwd=cwd or REPO_ROOT, capture_output=True,
            text=True, timeout=timeout_s, start_new_session=True,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited with {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def spawn_cli(self, *args: str, name: str, cwd: Path | None = None,
                  env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a long-lived `prefect ARGS` (a worker); stopped with the server."""
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            [str(PREFECT_BIN), *args], env={**self.env, **(env or {})}, cwd=cwd or REPO_ROOT,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._children.append((proc, log))
        return proc

    def api(self, method: str, path: str, body: object | None = None, timeout_s: float = 30) -> object:
        """One JSON call to the REST API (path relative to /api)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.api_url}/{path.lstrip('/')}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log_tail(self, n_chars: int = 4000, path: Path | None = None) -> str:
        path = path or self.log_path
        try:
            return path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def child_logs(self, n_chars: int = 6000) -> str:
        return "\n".join(f"--- {Path(log.name).name}\n{self.log_tail(n_chars, Path(log.name))}"
                         for _, log in self._children)
