#!/usr/bin/env bash
# Run docker-compose.cluster.yml for real with podman-compose: Redis (from Debian's
# packages), two brokers on it, two bots on each broker; check that bots on different
# brokers heard each other (their replies cross brokers, both ways) and that the shared
# history holds it, read through broker-b by a one-off container.
#
#   scripts/compose-cluster-smoke.sh     # exit 0 ok, 1 failed, 77 skipped (no podman)
#
# The work is scripts/compose-smoke.sh's, with the settings below.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ZCHAT_SMOKE_COMPOSE="$ROOT/docker-compose.cluster.yml"
export ZCHAT_SMOKE_BROKER=broker-a
export ZCHAT_SMOKE_READER=broker-b
export ZCHAT_SMOKE_BOTS="alice bob carol dave"
export ZCHAT_SMOKE_SERVICES="redis broker-a broker-b alice bob carol dave"
export ZCHAT_SMOKE_SIDES="alice=broker-a bob=broker-a carol=broker-b dave=broker-b"
export ZCHAT_SMOKE_EXTRAS="[redis]"
export ZCHAT_SMOKE_REDIS=1
export ZCHAT_SMOKE_WEB=0  # the cluster file has no web service
exec "$ROOT/scripts/compose-smoke.sh"
