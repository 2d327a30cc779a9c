#!/usr/bin/env bash
# Entrypoint of docker/worker.Dockerfile. With arguments: run them (a Docker or Kubernetes
# worker starts each flow run as `prefect flow-run execute` in this image). Without: start
# a Prefect worker that polls $MLSAE_POOL ($MLSAE_POOL_TYPE creates it with that type if it
# is missing; extra `prefect worker start` options in $MLSAE_WORKER_ARGS).
set -euo pipefail

if [ "$#" -gt 0 ]; then
  exec "$@"
fi
if [ -z "${PREFECT_API_URL:-}" ]; then
  echo "mlsae worker: set PREFECT_API_URL to the Prefect server's API" \
       "(e.g. -e PREFECT_API_URL=http://prefect.example:4200/api)" >&2
  exit 2
fi
type_args=()
if [ -n "${MLSAE_POOL_TYPE:-}" ]; then
  type_args=(--type "$MLSAE_POOL_TYPE")
fi
# --install-policy never: the image holds every worker package it needs; nothing is
# pip-installed at run time.
# shellcheck disable=SC2086  # MLSAE_WORKER_ARGS is a list of options
exec prefect worker start --pool "${MLSAE_POOL:-mlsae-process}" "${type_args[@]}" \
  --install-policy never ${MLSAE_WORKER_ARGS:-}
