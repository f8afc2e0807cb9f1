#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for bpstream (run as root, or with sudo available):
# Debian packages (mosquitto, influxdb, Java 17, Maven), uv, the Python 3.11 virtual environment with the
# project and its dev tools, and the Apache Kafka jars (Maven Central, cached in ~/.cache/bpstream).
# A second run only checks and returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v influxd >/dev/null 2>&1 || missing+=(influxdb)
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

PYTHON="${PYTHON:-python3}"
if command -v uv >/dev/null 2>&1; then
    UV=(uv)
else
    "$PYTHON" -m uv --version >/dev/null 2>&1 || "$PYTHON" -m pip install --quiet uv
    UV=("$PYTHON" -m uv)
fi

if [ ! -x .venv/bin/python ]; then
    "${UV[@]}" venv .venv -p 3.11 || "${UV[@]}" venv .venv -p "$(command -v python3.11 || command -v "$PYTHON")"
fi

# Reinstall only when the dependency list changed (or the project is not installed yet).
stamp=.venv/.bpstream-deps
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import bpstream" 2>/dev/null; then
    echo "bootstrap: installing the project and its dependencies into .venv"
    "${UV[@]}" pip install -p .venv/bin/python -e '.[dev]'
    echo "$want" > "$stamp"
fi

# kustomize renders the Kubernetes overlays in the deploy tests: kubectl (on this machine image) has it built in;
# elsewhere build it once through the Go module proxy.
if ! command -v kustomize >/dev/null 2>&1 && ! command -v kubectl >/dev/null 2>&1 && [ ! -x .venv/bin/kustomize ]; then
    echo "bootstrap: installing kustomize v5.5.0 with go install"
    GOBIN="$PWD/.venv/bin" go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0
fi

# Debian packages (again, for a machine where only they were missing) and the Kafka jars.
.venv/bin/python -c "
from bpstream.localservers.install import ensure_installed, kafka_libs_dir, KAFKA_VERSION
ensure_installed()
print(f'bootstrap: Apache Kafka {KAFKA_VERSION} jars in {kafka_libs_dir()}')
"
echo "bootstrap: done"
