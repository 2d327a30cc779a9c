"""Prefect task: check a run request and plan it BEFORE any compute (mlsae.plan does the work).

Reads only the model's config.json and weight headers and peeks at the data, so a
typo in a model name, k larger than the dictionary or a layer the model does not
have fails the flow run in seconds, with every problem listed and the fix named.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlsae.plan import InvalidRequest, Plan, RunRequest, normalise_model_name
from tasks.common import run_logger

InvalidParameters = InvalidRequest
"""The name flows and tests use for a request that cannot work."""

__all__ = ["InvalidParameters", "normalise_model_name", "validate_parameters"]


@task(name="validate-parameters", cache_policy=NO_CACHE)
def validate_parameters(request: RunRequest, out: str | None = None) -> Plan:
    """Fail fast (before any compute) with every problem in the request listed."""
    from mlsae.plan import make_plan

    plan = make_plan(request, out)
    run_logger().info("model %s: %d blocks x d_model %d; %d autoencoders planned; training "
                      "from the %s", plan["model"]["name"], plan["model"]["n_layers"],
                      plan["model"]["d_model"], len(plan["specs"]), plan["training_source"])
    return plan
