"""The sweep on Ray (prefect-ray's task runner, a local Ray instance of worker processes
started by the runner, sized by --max-workers), with a real Prefect server: every
autoencoder is written once, and every table and view equals those of the same sweep with
the default thread runner. (Unlike tests/test_sweep_dask.py, which tasks ran in which
worker process is not checked here.)

Marked slow and skipped without the ray extra: Ray is large and slow to start, so it is
not part of the default run. Run it with:

    pip install -e '.[ray]' && HF_HUB_OFFLINE=1 pytest -m slow tests/test_sweep_ray.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("prefect_ray", reason="the ray extra is not installed: pip install -e "
                                          "'.[ray]'")

from tests.test_flows_support import assert_same_warehouse  # noqa: E402
from tests.test_sweep_dask import (  # noqa: E402
    GRID,
    N_SAES,
    assert_each_autoencoder_once,
    thread_run,  # noqa: F401  (a module-scoped fixture: the same sweep, thread runner)
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_sweep_on_ray_equals_the_thread_runner_sweep(prefect_api, thread_run,  # noqa: F811
                                                         tmp_path):
    from flows.sweep import sweep

    out = tmp_path / "ray-warehouse"
    result = sweep(models=["embedded"], **GRID, task_runner="ray", max_workers=2, out=str(out))
    (run,) = result["runs"]
    assert len(run["sae_ids"]) == N_SAES
    assert_each_autoencoder_once(out, run["sae_ids"])
    assert_same_warehouse(thread_run, out)


def test_without_an_address_the_runner_starts_a_local_ray_of_max_workers_cpus():
    from prefect_ray import RayTaskRunner

    from flows.sweep import make_task_runner

    runner = make_task_runner("ray", 3)
    assert isinstance(runner, RayTaskRunner) and runner.address is None
    assert runner.init_kwargs["num_cpus"] == 3
    assert make_task_runner("ray", 3, "ray://head:10001").address == "ray://head:10001"
