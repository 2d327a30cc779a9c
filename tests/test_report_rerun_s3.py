"""The report and rerun flows on a warehouse in object storage (moto's real S3 server on a
free loopback port, s3fs over HTTP; a real temporary Prefect server):

- the report flow into s3:// trains into the bucket like the pipeline, its tables equal a
  local report run's, and report.md and its figures are committed objects in the bucket
  (where the layout puts reports); --copy-to fetches them from the bucket;
- the rerun registry over an s3 warehouse compares with the bucket's `saes` table
  (committed parts only): the model already there is done, only the missing one is
  started, and its run writes into the bucket; kind="report" sees the committed report;
- `mlsae report --out s3://... --dry-run` plans instead of refusing "a URL".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.s3_server import moto_s3
from tests.test_flows_support import assert_same_warehouse, request, save_tiny_model, table_rows
from tests.test_warehouse_s3_write import _fs, _uncommitted

pytestmark = pytest.mark.timeout(300)

BUCKET = "mlsae-report"
# The smallest star: one MLSAE (R 2, k 4, also the dose line) and a single-layer SAE per
# block of a random 2-block model, no lens.
STAR = dict(expansion_factors=[2], ks=[4], base_expansion_factor=2, base_k=4, lens="off",
            dose_expansion_factors=[2], dose_k=4, dose_train_tokens=4096, train_tokens=2048,
            eval_tokens=512,
            seq_len=64)


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with moto_s3(tmp_path_factory, BUCKET) as env:
        yield env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def _report(tiny: Path, out: str):
    from flows.report import report

    return report(**request(model=str(tiny), **STAR), preset="report", out=out,
                  models=[str(tiny)])


@pytest.fixture(scope="module")
def s3_report(prefect_api, s3_env, tiny):
    url = f"s3://{BUCKET}/wh"
    return url, _report(tiny, url)


def test_the_report_flow_writes_into_the_bucket_like_a_local_run(s3_report, tiny,
                                                                 tmp_path_factory, tmp_path):
    from flows.cmd_report import copy_report
    from flows.pipeline import pipeline
    from mlsae.plan import model_slug
    from mlsae.warehouse import report_key
    from mlsae.warehouse.remote import is_committed

    url, result = s3_report
    # the report's grid into a local directory: the same plan (the star given in full), by
    # the pipeline flow, which skips the report writing (its tables are the comparison)
    local = tmp_path_factory.mktemp("local-report")
    grid_only = {k: v for k, v in STAR.items() if k != "dose_train_tokens"}
    local_run = pipeline(**request(model=str(tiny), **grid_only), preset="report",
                         out=str(local))
    dose = pipeline(**request(model=str(tiny), **{**grid_only, "train_tokens": 4096,
                                                  "expansion_factors": [2], "ks": [4],
                                                  "baselines": False}),
                    preset="report", out=str(local))
    assert sorted(local_run["sae_ids"] + dose["sae_ids"]) == sorted(result["sae_ids"])
    assert result["out"] == url and len(result["sae_ids"]) == 1 + 2 + 1
    assert_same_warehouse(local, url)
    assert _uncommitted(url) == []

    # report.md and every figure it links are committed objects where the layout says
    slug = model_slug(str(tiny))
    assert result["report"] == f"{url}/{report_key(slug)}"
    assert result["report_dir"] == f"{url}/report/{slug}"
    assert is_committed(url, report_key(slug))
    text = _fs().cat_file(result["report"].removeprefix("s3://")).decode()
    for n in range(6):
        assert f"\n## {n}. " in text, n
    links = re.findall(r"\]\((figures/[^)]+)\)", text)
    assert links and all(is_committed(url, f"report/{slug}/{link}") for link in links), links
    # its numbers are the bucket's views (which equal the local run's)
    base = next(i for i in result["sae_ids"] if i.startswith("tiny-R2-k4-all-"))
    ((ratio,),) = table_rows(url, f"SELECT ratio_token FROM variance_summary WHERE sae_id = '{base}'")
    assert f" | {ratio:.3g} | " in text
    assert f"--out {url}" in text

    # --copy-to takes the report from the bucket
    copy = tmp_path / "copy"
    copy_report(result, slug, copy)
    assert (copy / "report.md").read_text() == text
    assert all((copy / link).stat().st_size > 1000 for link in links)


def test_the_rerun_registry_reads_the_bucket_and_starts_only_the_missing_model(
        s3_report, tmp_path):
    from flows.rerun import models_with_reports, models_with_results, rerun

    url, _ = s3_report
    other = save_tiny_model(tmp_path / "other")
    params = dict(expansion_factors=[2], ks=[4], train_tokens=2048, eval_tokens=512,
                  seq_len=64, baselines=False, lens="off")
    tiny = next(m for (m,) in table_rows(url, "SELECT DISTINCT model FROM saes"))
    registry = tmp_path / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": [
        {"model": tiny, "parameters": params}, {"model": str(other), "parameters": params}]}))
    assert models_with_results(url) == {tiny}

    result = rerun(registry=str(registry), variable="", out=url)
    assert result["mode"] == "subflow"
    assert result["done_before"] == [tiny] and result["started"] == [str(other)]
    # the run it started wrote into the bucket (committed, nothing else)
    assert models_with_results(url) == {tiny, str(other)}
    assert _uncommitted(url) == []
    again = rerun(registry=str(registry), variable="", out=url)
    assert again["started"] == [] and again["done_before"] == sorted([tiny, str(other)])

    # report mode: the bucket's committed report counts, the other model has none
    assert models_with_reports(url, [tiny, str(other)]) == {tiny}
    registry.write_text(yaml.safe_dump({"models": [{"model": tiny, "parameters": params}]}))
    done = rerun(registry=str(registry), variable="", out=url, kind="report")
    assert done["done_before"] == [tiny] and done["started"] == []


def test_uncommitted_objects_do_not_count_as_results_or_reports(s3_report, tmp_path):
    """A saes/layer_metrics part and a report uploaded without their commit objects (a
    worker killed mid-upload) are not results."""
    from flows.rerun import models_with_reports, models_with_results
    from mlsae.plan import model_slug
    from mlsae.warehouse import report_key, write_layer_metrics
    from mlsae.warehouse.records import SaeRecord, write_sae_record

    url, _ = s3_report
    ghost = "ghost-model"
    staged = tmp_path / "staged"
    write_sae_record(staged, SaeRecord(sae_id="ghost-R2-k4", model=ghost, d_model=32,
                                       n_latents=64, expansion_factor=2, k=4, layers=[0, 1]))
    write_layer_metrics(staged, "ghost-R2-k4", [
        {"layer": layer, "fvu": 0.5, "mse": 1.0, "l0": 4.0, "dead_fraction": 0.0,
         "delta_ce": 0.1, "kl": 0.1} for layer in (0, 1)])
    fs = _fs()
    for path in staged.rglob("*.parquet"):
        fs.put_file(str(path), f"{BUCKET}/wh/{path.relative_to(staged).as_posix()}")
    fs.pipe_file(f"{BUCKET}/wh/{report_key(model_slug(ghost))}", b"# torn\n")
    assert len(_uncommitted(url)) == 3
    assert ghost not in models_with_results(url)
    assert models_with_reports(url, [ghost]) == set()


def test_report_dry_run_takes_a_bucket_url(s3_env, tiny, tmp_path, monkeypatch):
    """`mlsae report --out s3://...` plans (no "is a URL" refusal) and writes nothing."""
    from click.testing import CliRunner

    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [
        "report", "--out", f"s3://{BUCKET}/dry", "--model", str(tiny), "-R", "2", "-k", "4",
        "--lens", "off", "--train-tokens", "2048", "--eval-tokens", "512", "--seq-len", "64",
        "--dry-run", "--json"])
    assert result.exit_code == 0, result.output[-3000:]
    assert "is a URL" not in result.output and '"saes"' in result.output, result.output
    assert list(tmp_path.iterdir()) == []
    assert not _fs().exists(f"{BUCKET}/dry")
