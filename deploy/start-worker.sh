#!/bin/sh
# Container command of the Prefect worker: ensure the work pool, then poll it for flow runs.
# Each flow run is a subprocess of this worker (work pool type `process`) and inherits its
# environment (UNET3D_WORKSPACE, PREFECT_API_URL).
set -eu
"$(dirname "$0")/ensure-work-pool.sh"
exec prefect worker start \
    --pool "${UNET3D_WORK_POOL:-unet3d-gpu}" \
    --type process \
    --name "${UNET3D_WORKER_NAME:-$(hostname)}" \
    --with-healthcheck
