"""docker/worker.Dockerfile, which cannot be built on machines without a Docker daemon:
what it installs agrees with pyproject.toml, scripts/bootstrap.sh, the library and
docs/deploy.md; its entrypoint starts a worker or runs a flow run; hadolint and
shellcheck (dev extra) pass."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
ENTRYPOINT = REPO / "docker" / "worker-entrypoint.sh"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    found, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
            current = ""
    return found


def args_and_env() -> dict[str, str]:
    values = {}
    for keyword, rest in instructions(DOCKERFILE):
        if keyword in ("ARG", "ENV"):
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                values[name] = value
    return values


def runs() -> str:
    return "\n".join(rest for keyword, rest in instructions(DOCKERFILE) if keyword == "RUN")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_torch_is_the_bootstraps_cpu_pin_and_within_pyprojects_range():
    version = args_and_env()["TORCH_VERSION"]
    assert f'"torch=={version}"' in (REPO / "scripts" / "bootstrap.sh").read_text()
    (torch,) = [Requirement(r) for r in pyproject()["project"]["dependencies"]
                if Requirement(r).name == "torch"]
    assert torch.specifier.contains(version)
    install = runs()
    assert 'cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"' in install
    assert 'cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}"' in install
    assert 'pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}"' \
        in install
    assert args_and_env()["TORCH_VARIANT"] == "cpu"  # the default build


def test_mlsae_is_installed_with_the_extras_the_docs_name():
    extras = args_and_env()["MLSAE_EXTRAS"].split(",")
    assert set(extras) >= {"s3", "dask", "workers"}
    assert set(extras) <= set(pyproject()["project"]["optional-dependencies"])
    workers = {Requirement(r).name for r in pyproject()["project"]["optional-dependencies"][
        "workers"]}
    assert workers == {"prefect-docker", "prefect-kubernetes"}
    assert 'pip install --no-cache-dir -e ".[${MLSAE_EXTRAS}]"' in runs()
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert "docker build -f docker/worker.Dockerfile" in deploy
    assert "TORCH_VARIANT=cuda" in deploy


def test_scratch_and_hf_cache_are_volumes_the_library_uses():
    from mlsae.warehouse.layout import SCRATCH_ENV

    values = args_and_env()
    volumes = [rest for keyword, rest in instructions(DOCKERFILE) if keyword == "VOLUME"]
    assert volumes, "no VOLUME"
    declared = set(re.findall(r'"([^"]+)"', volumes[0]))
    assert {values[SCRATCH_ENV], values["HF_HOME"]} == declared


def test_runs_as_a_numeric_non_root_user_with_the_entrypoint():
    found = instructions(DOCKERFILE)
    users = [rest for keyword, rest in found if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    (entry,) = [rest for keyword, rest in found if keyword == "ENTRYPOINT"]
    copied = [rest for keyword, rest in found if keyword == "COPY" and "entrypoint" in rest]
    assert copied and "docker/worker-entrypoint.sh" in copied[0]
    assert copied[0].split()[-1] in entry
    assert os.access(ENTRYPOINT, os.X_OK)


def test_the_build_context_keeps_the_sources_and_drops_environments_and_data():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".venv", "mlsae-data", ".git"} <= set(ignored)
    for needed in ("pyproject.toml", "README.md", "mlsae", "flows", "tasks", "sql", "docker"):
        assert needed not in ignored


@pytest.fixture
def fake_prefect(tmp_path):
    """A `prefect` on PATH that prints the arguments it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "prefect"
    fake.write_text('#!/usr/bin/env bash\necho "prefect $*"\n')
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MLSAE_", "PREFECT_API_URL"))}
    return subprocess.run([str(ENTRYPOINT), *args], capture_output=True, text=True,
                          timeout=30, env={**clean, **env})


def test_entrypoint_starts_a_worker_for_the_pool(fake_prefect):
    api = {"PREFECT_API_URL": "http://prefect:4200/api"}
    done = entrypoint(env={**fake_prefect, **api})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["prefect", "worker", "start", "--pool", "mlsae-process",
                                   "--install-policy", "never"]
    done = entrypoint(env={**fake_prefect, **api, "MLSAE_POOL": "gpu-k8s",
                           "MLSAE_POOL_TYPE": "kubernetes", "MLSAE_WORKER_ARGS": "--limit 2"})
    assert done.stdout.split() == ["prefect", "worker", "start", "--pool", "gpu-k8s", "--type",
                                   "kubernetes", "--install-policy", "never", "--limit", "2"]


def test_entrypoint_runs_a_flow_run_command_and_needs_a_server_to_start_a_worker(
        fake_prefect):
    done = entrypoint("prefect", "flow-run", "execute", env=fake_prefect)
    assert done.returncode == 0 and done.stdout.split() == ["prefect", "flow-run", "execute"]
    done = entrypoint(env=fake_prefect)
    assert done.returncode == 2 and "PREFECT_API_URL" in done.stderr


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (dev extra)")
    return found


def test_hadolint_passes():
    done = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_passes_on_the_entrypoint():
    done = subprocess.run([_tool("shellcheck"), str(ENTRYPOINT)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("variant, index_url, expected", [
    ("cpu", "", "https://download.pytorch.org/whl/cpu"),
    ("cuda", "", "https://pypi.org/simple"),
    ("cuda", "https://download.pytorch.org/whl/cu126", "https://download.pytorch.org/whl/cu126"),
])
def test_the_torch_step_picks_the_index_of_the_variant(fake_prefect, tmp_path, variant,
                                                       index_url, expected):
    """The Dockerfile's torch RUN step, run by bash with a `pip` that prints its arguments."""
    (step,) = [rest for keyword, rest in instructions(DOCKERFILE)
               if keyword == "RUN" and "TORCH_VARIANT" in rest]
    pip = tmp_path / "bin" / "pip"
    pip.write_text('#!/usr/bin/env bash\necho "pip $*"\n')
    pip.chmod(0o755)
    env = {**os.environ, **fake_prefect, "TORCH_VARIANT": variant, "TORCH_VERSION": "2.13.0",
           "TORCH_INDEX_URL": index_url}
    done = subprocess.run(["bash", "-o", "pipefail", "-c", step], capture_output=True,
                          text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pip", "install", "--no-cache-dir", "--index-url", expected,
                                   "torch==2.13.0"]
    env["TORCH_VARIANT"] = "rocm"
    done = subprocess.run(["bash", "-c", step], capture_output=True, text=True, env=env,
                          timeout=30)
    assert done.returncode == 1 and "cpu or cuda" in done.stderr
