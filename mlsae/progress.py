"""One progress reporter for every long loop: rate, ETA and extra fields, on stderr.

Prefect tasks pass `log=logger.info` to route the same lines to the run log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from mlsae import interrupt


def to_stderr(line: str) -> None:
    """The default place for progress lines and other run messages."""
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Reports `done/total unit` with a rate, at most every `every_s` seconds.

    `initial`: units already done before this run (a resumed job): `done` starts there, so
    the total stays the whole job's, while the rate and ETA count only this run's work.
    `stops`: update() raises mlsae.interrupt.Interrupted once a stop was requested (Ctrl-C
    in the CLI). Loops whose writes are atomic per part keep the default; a loop with its
    own safe point (training: checkpoint first) passes False and checks itself.
    """

    def __init__(self, desc: str, total: float | None = None, unit: str = "tokens",
                 every_s: float = 5.0, log: Callable[[str], None] | None = None,
                 initial: float = 0.0, stops: bool = True):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stops = stops
        self.log = log or to_stderr
        self.initial = self.done = float(initial)
        self.start = self._last = time.perf_counter()

    def update(self, n: float, **fields: object) -> None:
        if self.stops:
            interrupt.check(f"{self.desc} stopped")
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.log(self._line(now, fields))

    def close(self, **fields: object) -> float:
        """Report the final line; return the mean rate (units per second)."""
        now = time.perf_counter()
        self.log(self._line(now, fields) + " (done)")
        return self.rate(now)

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.perf_counter()) - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def _line(self, now: float, fields: dict) -> str:
        rate = self.rate(now)
        parts = [f"{self.desc}: {self.done:,.0f}"]
        if self.total:
            parts[0] += f"/{self.total:,.0f}"
            if rate > 0 and self.done < self.total:
                parts.append(f"ETA {(self.total - self.done) / rate:,.0f}s")
        parts.append(f"{rate:,.0f} {self.unit}/s")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        return " | ".join(parts)
