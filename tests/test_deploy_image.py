"""`mlsae deploy` for container pools and bucket warehouses, without a server: the rendered
prefect.yaml runs the flows in the worker image's checkout, and `--out` keeps a URL."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.cmd_deploy import IMAGE_WORKDIR, REPO_ROOT, render_prefect_file, warehouse_parameter


def test_an_image_sets_each_deployments_image_and_the_images_working_directory(tmp_path):
    target = tmp_path / "prefect.yaml"
    render_prefect_file(REPO_ROOT / "prefect.yaml", "gpu-k8s", "s3://bucket/wh", True, target,
                        image="registry.example/mlsae-worker:cuda")
    spec = yaml.safe_load(target.read_text())
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory":
                             {"directory": IMAGE_WORKDIR}}]
    for deployment in spec["deployments"]:
        pool = deployment["work_pool"]
        assert pool["name"] == "gpu-k8s"
        assert pool["job_variables"]["image"] == "registry.example/mlsae-worker:cuda"
        assert pool["job_variables"]["env"]["TOKENIZERS_PARALLELISM"] == "false"  # kept
        assert deployment["parameters"]["out"] == "s3://bucket/wh"
    # the Dockerfile puts the repository where the pull step looks for it
    dockerfile = (REPO_ROOT / "docker" / "worker.Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_WORKDIR}\n" in dockerfile


def test_without_an_image_the_flows_run_from_this_checkout(tmp_path):
    target = tmp_path / "prefect.yaml"
    render_prefect_file(REPO_ROOT / "prefect.yaml", "mlsae-process", None, True, target)
    spec = yaml.safe_load(target.read_text())
    assert "pull" not in spec  # prefect deploy records this directory
    assert all("image" not in d["work_pool"].get("job_variables", {})
               for d in spec["deployments"])


def test_a_process_worker_in_the_image_runs_the_flows_from_its_checkout(tmp_path):
    target = tmp_path / "prefect.yaml"
    render_prefect_file(REPO_ROOT / "prefect.yaml", "gpu", None, True, target,
                        workdir=IMAGE_WORKDIR)
    spec = yaml.safe_load(target.read_text())
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory":
                             {"directory": IMAGE_WORKDIR}}]
    assert all("image" not in d["work_pool"].get("job_variables", {})
               for d in spec["deployments"])


def test_out_keeps_a_url_and_makes_a_directory_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert warehouse_parameter("s3://bucket/wh") == "s3://bucket/wh"
    assert warehouse_parameter("wh") == str(Path(tmp_path / "wh").resolve())
    assert warehouse_parameter(None) is None
