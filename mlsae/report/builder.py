"""Write the report: facts (facts.py) -> verdicts (verdicts.py) -> sections (sections.py)
-> report.md, atomically, with its figures and the ledger of report runs."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import NamedTuple

from mlsae.report import facts, sections, verdicts
from mlsae.report.inputs import ReportInputs
from mlsae.report.markdown import Page
from mlsae.warehouse.layout import REPORT_FILE

REPORT_NAME = REPORT_FILE
LEDGER_NAME = "runs.json"


class ReportOutput(NamedTuple):
    report: Path
    figures: list[Path]
    facts: facts.ReportFacts
    """What the report read (one NamedTuple per section)."""
    verdicts: verdicts.Verdicts
    """What it decided from them."""


def record_run(report_dir: Path, started_at: float | None) -> list[dict]:
    """Append this run to the report's ledger of runs (start, wall time); return the ledger."""
    path = report_dir / LEDGER_NAME
    ledger = json.loads(path.read_text()) if path.exists() else []
    if started_at is not None:
        now = dt.datetime.now(dt.UTC).timestamp()
        # The machine's load says how much of the wall time other work took.
        load = os.getloadavg()[2] if hasattr(os, "getloadavg") else None
        ledger.append({"started": dt.datetime.fromtimestamp(started_at, dt.UTC)
                       .strftime("%Y-%m-%d %H:%M"), "wall_s": round(now - started_at, 1),
                       "load_15min": None if load is None else round(load, 2)})
        report_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{LEDGER_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(ledger, indent=1) + "\n")
        os.replace(tmp, path)
    return ledger


def write_report(inputs: ReportInputs, report_dir: str | os.PathLike) -> ReportOutput:
    """Write report.md and its figures into `report_dir` (replacing an older report there)."""
    report_dir = Path(report_dir)
    ledger = record_run(report_dir, inputs.started_at)
    found = facts.gather(inputs, ledger)
    decided = verdicts.decide(found)
    page = Page(report_dir, inputs.pipeline_figures)
    sections.render(page, found, decided)
    path = report_dir / REPORT_NAME
    tmp = path.with_name(f".{REPORT_NAME}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(page.lines).rstrip() + "\n")
    os.replace(tmp, path)
    return ReportOutput(path, page.figures, found, decided)
