"""`mlsae sql` through the CLI: a directory that is not a warehouse is refused (rc != 0,
a message saying how to make one), an initialised but still empty warehouse works, and
--format table shows control characters in text escaped (csv/json keep the raw text)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from flows.cli import main
from mlsae import warehouse as wh
from mlsae.latents import LatentLogConfig, SaeRecord, write_latents


def sql(*args: str):
    return CliRunner().invoke(main, ["sql", *args])


def test_plain_directory_is_not_a_warehouse(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "data").mkdir()
    for args in (["SELECT count(*) FROM saes"], ["--setup"]):
        result = sql("--out", str(tmp_path), *args)
        assert result.exit_code != 0, result.output
        assert "is not an mlsae warehouse" in result.output
        assert f"mlsae run --out {tmp_path}" in result.output
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]  # nothing written
    result = sql("--out", str(tmp_path / "missing"), "SELECT 1")
    assert result.exit_code != 0 and "does not exist" in result.output


def test_initialised_warehouse_without_tables_answers_with_empty_tables(tmp_path):
    wh.init_warehouse(tmp_path / "wh")
    result = sql("--out", str(tmp_path / "wh"), "--format", "csv", "SELECT count(*) AS n FROM saes")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["n", "0"]
    # a first `mlsae run` stopped before it logged anything (only its caches exist)
    (tmp_path / "run" / "autoencoders").mkdir(parents=True)
    result = sql("--out", str(tmp_path / "run"), "SELECT count(*) FROM latents")
    assert result.exit_code == 0, result.output


TOKENS = {5: "line\nbreak", 6: "\ttab", 7: "cr\r", 8: "bell\x07", 9: "plain"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One SAE whose logged tokens include a newline, a tab, a CR and a C0 control."""
    root = tmp_path_factory.mktemp("ctl")
    record = SaeRecord(sae_id="ctl", model="synthetic", d_model=4, n_latents=4,
                       expansion_factor=1, k=1, layers=[0])
    tokens = np.array([[5, 6, 7, 8, 9]])

    def encode(tokens_BT, mask_BT):
        n = int(mask_BT.sum())
        return np.ones((n, 1, 1), np.float32), np.zeros((n, 1, 1), np.int64)

    write_latents(root, record, zip(tokens, np.ones_like(tokens, bool), strict=True), encode,
                  TOKENS.__getitem__, {}, LatentLogConfig(batch_size=1),
                  progress_log=lambda _: None)
    return root


QUERY = "SELECT pos, token FROM tokens ORDER BY pos"


def test_table_format_escapes_control_characters(root):
    result = sql("--out", str(root), QUERY)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 + len(TOKENS) + 1  # header, rule, one line per row, count
    body = "\n".join(lines)
    for shown in ("line\\nbreak", "\\ttab", "cr\\r", "bell\\x07", "plain"):
        assert shown in body
    raw = result.stdout_bytes.decode()
    assert "\t" not in raw and "\r" not in raw and "\x07" not in raw
    widths = {len(line) for line in lines[:-1]}
    assert len(widths) == 1  # the columns still line up


def test_csv_and_json_keep_the_raw_text(root):
    result = sql("--out", str(root), "--format", "csv", QUERY)
    assert result.exit_code == 0, result.output
    raw = result.stdout_bytes.decode()  # .stdout turns "\r\n" into "\n"
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    assert [r[1] for r in rows[1:]] == list(TOKENS.values())
    result = sql("--out", str(root), "--format", "json", QUERY)
    tokens = [r["token"] for r in json.loads(result.stdout_bytes.decode())]
    assert tokens == list(TOKENS.values())
