"""`mlsae deploy`: register the deployments of prefect.yaml on a Prefect server.

What it does, in order (each step is also a plain Prefect command, see docs/deploy.md):
1. checks that a server is configured (PREFECT_API_URL) and answers;
2. creates the work pool if it is missing (process type: a worker on this
   machine runs each flow run as a subprocess);
3. creates or resizes the `mlsae-gpu` concurrency limit (one slot per GPU);
4. runs `prefect deploy --all` on a copy of prefect.yaml with the pool name,
   the warehouse (`out` parameter: a directory or a URL such as s3://bucket/prefix)
   and the rerun schedule filled in, from the repository root so workers run the
   flows from this checkout; or, with --image (a Docker or Kubernetes pool), from
   the checkout inside docker/worker.Dockerfile's image.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from mlsae.paths import default_warehouse

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POOL = "mlsae-process"
IMAGE_WORKDIR = "/opt/mlsae"
"""Where docker/worker.Dockerfile puts the repository (the flows' working directory)."""


def deploy_env() -> dict[str, str]:
    """Prefect settings mlsae uses everywhere: no telemetry, patient ephemeral start-up."""
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    return env


def render_prefect_file(source: Path, pool: str, out: str | Path | None, schedule: bool,
                        target: Path, image: str | None = None,
                        workdir: str | None = None) -> list[str]:
    """Copy prefect.yaml with pool/out/schedule filled in; return the deployment names.
    With `image`: flow runs start in that image (a Docker or Kubernetes pool's job
    variable). The flows run from `workdir` (default: the image's checkout with an image,
    else the directory `prefect deploy` runs in, this checkout)."""
    import yaml

    spec = yaml.safe_load(source.read_text())
    workdir = workdir or (IMAGE_WORKDIR if image else None)
    if workdir:
        spec["pull"] = [{"prefect.deployments.steps.set_working_directory":
                         {"directory": workdir}}]
    names = []
    for deployment in spec.get("deployments") or []:
        deployment.setdefault("work_pool", {})["name"] = pool
        if image:
            deployment["work_pool"].setdefault("job_variables", {})["image"] = image
        if out is not None and "out" in (deployment.get("parameters") or {}):
            deployment["parameters"]["out"] = str(out)
        for sched in deployment.get("schedules") or []:
            sched["active"] = bool(schedule)
        entry = deployment["entrypoint"]
        names.append(f"{entry.rsplit(':', 1)[1]} ({deployment['name']})")
    spec.pop("definitions", None)  # anchors are already expanded by safe_load
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return names


def ensure_work_pool(pool: str, image: str | None = None) -> bool:
    """Create a process work pool named `pool` unless it exists; True if created. With an
    image the pool must exist already and run containers (docker, kubernetes, ...)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            if image:
                raise click.ClickException(
                    f"work pool {pool!r} does not exist: create the container pool first, e.g. "
                    f"`prefect work-pool create {pool} --type kubernetes` (or --type docker)"
                    ) from None
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
        if image and found.type == "process":
            raise click.ClickException(
                f"--image needs a Docker or Kubernetes work pool; {pool!r} is a process pool "
                "(its worker runs the flows from a checkout: leave --image out)")
        return False


def warehouse_parameter(out: str | None) -> str | None:
    """The flows' `out`: a URL as given (checked that its filesystem is installed), a
    directory made absolute here (workers may start elsewhere)."""
    if out is None:
        return None
    from mlsae.warehouse import check_writable, is_url

    if is_url(out):
        try:
            check_writable(out)
        except Exception as err:  # WarehouseError: names the extra to install
            raise click.ClickException(str(err)) from err
        return out
    return str(Path(out).expanduser().resolve())


def check_server() -> str:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise click.ClickException(
            "no Prefect server configured. Start one with `prefect server start` (another "
            "terminal), then `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` "
            "(or export PREFECT_API_URL) and run `mlsae deploy` again")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise click.ClickException(f"the Prefect server at {url} does not answer ({error}): "
                                   "is `prefect server start` running?")
    return url


@click.command("deploy")
@click.option("--pool", default=DEFAULT_POOL, show_default=True,
              help="Work pool the deployments submit to (created as a process pool if missing; "
                   "create a docker/kubernetes pool yourself first to use one).")
@click.option("--out", default=None,
              help="Warehouse the deployed flows write to: a directory or a URL such as "
                   "s3://bucket/prefix (default: the worker's $MLSAE_HOME, else "
                   "<repo>/mlsae-data).")
@click.option("--gpu-slots", type=int, default=None,
              help="Size of the `mlsae-gpu` concurrency limit (default: GPUs visible here; "
                   "0 skips it).")
@click.option("--schedule/--no-schedule", default=True, show_default=True,
              help="Whether the rerun deployment's cron schedule starts active.")
@click.option("--image", default=None,
              help="For a Docker or Kubernetes pool: the image flow runs start in "
                   "(docker/worker.Dockerfile); the flows run from its checkout at "
                   f"{IMAGE_WORKDIR}.")
@click.option("--workdir", default=None,
              help="The checkout workers run the flows from (default: this one; with --image "
                   f"{IMAGE_WORKDIR}). E.g. {IMAGE_WORKDIR} for a process worker started from "
                   "the image.")
@click.option("--prefect-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=REPO_ROOT / "prefect.yaml", show_default="<repo>/prefect.yaml")
def command(pool: str, out: str | None, gpu_slots: int | None, schedule: bool,
            image: str | None, workdir: str | None, prefect_file: Path) -> None:
    """Register the pipeline, sweep and rerun deployments on a Prefect server.

    \b
    Before: a server is running and PREFECT_API_URL points at it:
      prefect server start                 # in another terminal
      prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    Then:
      mlsae deploy                         # pool + deployments
      mlsae deploy --pool k8s --image registry.example/mlsae-worker:cuda \
                   --out s3://bucket/wh        # a Kubernetes pool, the warehouse in a bucket
      prefect worker start --pool mlsae-process
      prefect deployment run mlsae-pipeline/default
    Open http://127.0.0.1:4200 to watch the runs. docs/deploy.md has the details
    (GPU pools, Docker, Kubernetes).
    """
    for key, value in deploy_env().items():
        os.environ.setdefault(key, value)
    url = check_server()
    if ensure_work_pool(pool, image):
        click.echo(f"created process work pool {pool!r}")
    else:
        click.echo(f"using work pool {pool!r}")
    if gpu_slots != 0:
        from tasks.common import GPU_LIMIT, ensure_gpu_limit

        slots = ensure_gpu_limit(gpu_slots)
        if slots:
            click.echo(f"concurrency limit {GPU_LIMIT!r}: {slots} slot(s)")

    out_abs = warehouse_parameter(out)
    with tempfile.TemporaryDirectory(prefix="mlsae-deploy-") as tmp:
        rendered = Path(tmp) / "prefect.yaml"
        names = render_prefect_file(prefect_file, pool, out_abs, schedule, rendered, image,
                                    workdir)
        argv = [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all",
                "--prefect-file", str(rendered)]
        result = subprocess.run(argv, cwd=REPO_ROOT, env=deploy_env(), capture_output=True,
                                text=True)
    if result.returncode != 0:
        raise click.ClickException(f"`prefect deploy --all` failed:\n{result.stdout[-3000:]}"
                                   f"\n{result.stderr[-3000:]}")
    click.echo(f"deployed to {url}: " + ", ".join(names))
    ui = url.removesuffix("/api")
    click.echo("\nNext:")
    click.echo(f"  prefect worker start --pool {pool}      # runs the flows (leave it running)")
    click.echo("  prefect deployment run mlsae-pipeline/default")
    click.echo("  prefect deployment run mlsae-rerun/default   # also runs on its cron schedule")
    click.echo(f"  open {ui} to watch; outputs land in "
               f"{out_abs or 'the worker’s $MLSAE_HOME, else <repo>/' + str(default_warehouse())}")
