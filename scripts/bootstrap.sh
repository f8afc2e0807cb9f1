#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for bpstream (run as root, or with sudo available):
# Debian packages (mosquitto, Java 17, Maven), uv, the Python 3.11 virtual environment with the project and its
# dev tools, the Apache Kafka jars (Maven Central) and InfluxDB built with `go install` from the Go module proxy
# (Go and Rust must be installed; about 4 minutes on 2 cores the first time), both cached in ~/.cache/bpstream.
# A second run only checks and returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    fi
fi

# uv itself is pinned: the lock file format and the resolver are uv's, so a new uv cannot change what installs.
UV_VERSION=0.13.8
PYTHON="${PYTHON:-python3}"
if [ "$(uv --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    UV=(uv)
else
    if [ "$("$PYTHON" -m uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
        "$PYTHON" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
    fi
    UV=("$PYTHON" -m uv)
fi

# Exactly the versions in the committed uv.lock (--frozen: never re-resolve, fail if pyproject and lock disagree
# instead of silently installing something else). Re-synced only when the lock changed.
stamp=.venv/.bpstream-lock
want="$(cat uv.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import bpstream" 2>/dev/null; then
    echo "bootstrap: installing the locked dependencies and the project into .venv (uv sync --frozen)"
    "${UV[@]}" sync --frozen --extra dev --python "$(command -v python3.11 || command -v "$PYTHON")"
    echo "$want" > "$stamp"
fi

# kustomize renders the Kubernetes overlays in the deploy tests: kubectl (on this machine image) has it built in;
# elsewhere build it once through the Go module proxy.
if ! command -v kustomize >/dev/null 2>&1 && ! command -v kubectl >/dev/null 2>&1 && [ ! -x .venv/bin/kustomize ]; then
    echo "bootstrap: installing kustomize v5.5.0 with go install"
    GOBIN="$PWD/.venv/bin" go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0
fi

# Debian packages (again, for a machine where only they were missing), the Kafka jars and InfluxDB (built once,
# the same version as the deployed image; see bpstream/localservers/install.py).
.venv/bin/python -c "
from bpstream.localservers.install import ensure_installed, kafka_libs_dir, KAFKA_VERSION, INFLUXDB_VERSION
paths = ensure_installed()
print(f'bootstrap: Apache Kafka {KAFKA_VERSION} jars in {kafka_libs_dir()}')
print(f'bootstrap: InfluxDB {INFLUXDB_VERSION} at {paths[\"influxd\"]}')
"
echo "bootstrap: done"
