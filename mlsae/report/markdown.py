"""Markdown pieces of the report: number formatting, tables, rerunnable query blocks, and
the page that collects lines and figures."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIGURE_DIR = "figures"


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def pct(share: float | None) -> str:
    """A share as a percentage, e.g. 0.348 -> '34.8%'."""
    return "-" if share is None else f"{fmt(100 * share)}%"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |"
              for row in rows]
    return lines + [""]


def sql_block(sql: str, out: str | None) -> list[str]:
    """The query as a reader reruns it: `mlsae sql [--out W] "..."`."""
    one_line = " ".join(sql.split())
    where = f" --out {out}" if out else ""
    return ["```sh", f'mlsae sql{where} "{one_line}"', "```", ""]


class Page:
    """The report being written: its lines, and the figures it draws or copies in."""

    def __init__(self, report_dir: Path, pipeline_figures: Sequence[str] = ()):
        self.fig_dir = report_dir / FIGURE_DIR
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline_figures = [Path(p) for p in pipeline_figures]
        self.lines: list[str] = []
        self.figures: list[Path] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def path(self, name: str) -> Path:
        """Where a figure drawn for the report goes."""
        return self.fig_dir / name

    def figure(self, path: Path, caption: str) -> None:
        self.figures.append(path)
        self.add(f"![{caption}]({FIGURE_DIR}/{path.name})", "", f"*{caption}*", "")

    def copy_figure(self, name: str, sae_id: str | None, target: str, caption: str) -> bool:
        """Copy one of the pipeline's figures (matched by file name and sae_id directory)."""
        for src in self.pipeline_figures:
            if src.name == name and (sae_id is None or src.parent.name == sae_id):
                if not src.exists():
                    return False
                dst = self.fig_dir / target
                shutil.copyfile(src, dst)
                self.figure(dst, caption)
                return True
        return False
