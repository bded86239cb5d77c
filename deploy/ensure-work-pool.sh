#!/bin/sh
# Make sure the Prefect work pool for unet3d exists and admits one flow run at a time.
#
# Prefect 3.9's `prefect work-pool create` has no concurrency option, so the limit is set (and
# re-set on every start, in case someone changed it in the UI) with `set-concurrency-limit`.
# Settings: PREFECT_API_URL (required), UNET3D_WORK_POOL (default unet3d-gpu),
# UNET3D_POOL_CONCURRENCY (default 1), UNET3D_API_WAIT_S (default 120).
set -eu

pool="${UNET3D_WORK_POOL:-unet3d-gpu}"
limit="${UNET3D_POOL_CONCURRENCY:-1}"
wait_s="${UNET3D_API_WAIT_S:-120}"

: "${PREFECT_API_URL:?PREFECT_API_URL must point at the Prefect server, e.g. http://prefect-server:4200/api}"

# The server may still be migrating its database when this container starts.
waited=0
until python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=5)" \
        "${PREFECT_API_URL%/}" >/dev/null 2>&1; do
    if [ "$waited" -ge "$wait_s" ]; then
        echo "ensure-work-pool: Prefect API at $PREFECT_API_URL not healthy after ${wait_s}s" >&2
        exit 1
    fi
    sleep 3
    waited=$((waited + 3))
done

if ! prefect work-pool inspect "$pool" >/dev/null 2>&1; then
    # Another container (worker or deploy job) may create it at the same moment: that is fine.
    prefect work-pool create "$pool" --type process \
        || prefect work-pool inspect "$pool" >/dev/null
fi
prefect work-pool set-concurrency-limit "$pool" "$limit"
