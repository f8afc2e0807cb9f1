"""Install what the local servers need: Mosquitto (Debian), the Apache Kafka jars, and InfluxDB built from source.

The Kafka jars come from Maven Central through ``mvn dependency:copy-dependencies`` into a cache folder shared
by every checkout on the machine (``~/.cache/bpstream/kafka-<version>/libs``), so CI runs reuse them.

InfluxDB is built with ``go install`` from the Go module proxy into ``~/.cache/bpstream/influxdb-<version>/``:
the same version as the image that docker-compose.yml and the Kubernetes overlays deploy (a unit test checks
they agree, an integration test checks the running server reports it). Debian's package (1.6.7) is too old for
the v2 compatibility API (``/api/v2/write``) that ``influxdb-client`` speaks. InfluxDB 1.9 and later link
Flux's Rust library (libflux): ``influxdata/pkg-config`` stands in for ``pkg-config`` and compiles it with the
installed Rust toolchain. About 4 minutes the first time on 2 cores, seconds after (Go's caches).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: Newest Apache Kafka 4.x that works with aiokafka 0.14 and faust-streaming 0.15.3 (see docs/LOCAL_SERVERS.md).
KAFKA_VERSION = os.environ.get("BPSTREAM_KAFKA_VERSION", "4.4.0")
#: log4j's SLF4J 1.x binding, matching the log4j-core that kafka_2.13 brings.
LOG4J_VERSION = "2.25.5"

#: InfluxDB OSS release built for tests and the demo, and the tag of the ``influxdb`` image deployed. Both the Go
#: module proxy (``go list -m -versions github.com/influxdata/influxdb``) and the official image serve it.
INFLUXDB_VERSION = "1.13.1"
#: influxdata's pkg-config wrapper that builds Flux's Rust library while ``go build`` runs cgo.
INFLUX_PKG_CONFIG_VERSION = "v0.3.0"

_DEBIAN_PACKAGES = {"mosquitto": "/usr/sbin/mosquitto"}
_DEBIAN_PACKAGE_OF = {"mosquitto": "mosquitto"}

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.bpstream</groupId>
  <artifactId>kafka-server-libs</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


class InstallError(RuntimeError):
    """Something the servers need could not be installed; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("BPSTREAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bpstream"
    )
    return Path(base)


def kafka_libs_dir(version: str = KAFKA_VERSION) -> Path:
    return cache_dir() / f"kafka-{version}" / "libs"


def influxdb_dir(version: str = INFLUXDB_VERSION) -> Path:
    return cache_dir() / f"influxdb-{version}"


def influxd_path(version: str = INFLUXDB_VERSION) -> Path:
    return influxdb_dir(version) / "bin" / "influxd"


def find_executable(name: str) -> str | None:
    """Path of ``mosquitto`` (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    fallback = _DEBIAN_PACKAGES.get(name)
    return fallback if fallback and os.access(fallback, os.X_OK) else None


def _apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0:
        raise InstallError(f"missing Debian packages {packages}: run `sudo apt-get install -y {' '.join(packages)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0:
        return
    subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InstallError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")


def ensure_debian_packages() -> dict[str, str]:
    """Install mosquitto if absent; return the path of its executable."""
    missing = [_DEBIAN_PACKAGE_OF[name] for name in _DEBIAN_PACKAGES if find_executable(name) is None]
    if missing:
        _apt_install(missing)
    paths: dict[str, str] = {}
    for name in _DEBIAN_PACKAGES:
        path = find_executable(name)
        if path is None:
            raise InstallError(f"{name} is still missing after installing its Debian package")
        paths[name] = path
    return paths


def ensure_kafka_libs(version: str = KAFKA_VERSION) -> Path:
    """Copy the Kafka broker jars and their runtime dependencies from Maven Central into the cache."""
    libs = kafka_libs_dir(version)
    marker = libs.parent / ".complete"
    if marker.exists() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    if shutil.which("java") is None:
        raise InstallError("java is not installed: run `apt-get install -y openjdk-17-jre-headless`")
    if shutil.which("mvn") is None:
        raise InstallError("mvn is not installed: run `apt-get install -y maven`")
    libs.parent.mkdir(parents=True, exist_ok=True)
    (libs.parent / "pom.xml").write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION))
    tmp = libs.parent / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = ["mvn", "-B", "-q", "-f", str(libs.parent / "pom.xml"), "dependency:copy-dependencies",
           f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InstallError(f"downloading Kafka {version} jars failed:\n{(result.stdout + result.stderr)[-3000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.write_text(version + "\n")
    return libs


def _run_build(cmd: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InstallError(f"{what} failed (`{' '.join(cmd)}`):\n{(result.stdout + result.stderr)[-3000:]}")


def ensure_influxd(version: str = INFLUXDB_VERSION) -> Path:
    """Build ``influxd`` ``version`` from the Go module proxy once; later calls return the cached binary."""
    root = influxdb_dir(version)
    binary = influxd_path(version)
    marker = root / ".complete"
    if marker.exists() and os.access(binary, os.X_OK):
        return binary
    go = shutil.which("go")
    if go is None:
        raise InstallError("go is not installed: InfluxDB is built with `go install` (Go 1.23 or later)")
    if shutil.which("cargo") is None:
        raise InstallError("cargo is not installed: InfluxDB's Flux library is compiled with Rust (rustup stable)")
    print(f"localservers: building InfluxDB {version} with go install (a few minutes the first time)",
          file=sys.stderr, flush=True)
    tools, partial = root / "tools", root / "bin.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tools.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "GOFLAGS"}
    env.update(GOBIN=str(tools), CGO_ENABLED="1")
    _run_build([go, "install", f"github.com/influxdata/pkg-config@{INFLUX_PKG_CONFIG_VERSION}"], env,
               "building influxdata/pkg-config")
    # The wrapper must be the `pkg-config` cgo finds first; Flux pins a Rust toolchain that cannot be
    # downloaded here, so the installed stable toolchain compiles it.
    env.update(GOBIN=str(partial), PATH=f"{tools}{os.pathsep}{env.get('PATH', '')}", RUSTUP_TOOLCHAIN="stable")
    _run_build([go, "install", "-ldflags", f"-X main.version={version}",
                f"github.com/influxdata/influxdb/cmd/influxd@v{version}"], env, f"building InfluxDB {version}")
    built = partial / "influxd"
    result = subprocess.run([str(built), "version"], capture_output=True, text=True, check=False)
    if result.returncode != 0 or version not in result.stdout.replace("v", " ").split():
        raise InstallError(f"the built influxd does not report version {version}: {result.stdout}{result.stderr}")
    shutil.rmtree(binary.parent, ignore_errors=True)
    partial.rename(binary.parent)
    marker.write_text(version + "\n")
    return binary


def ensure_installed() -> dict[str, str]:
    """Everything the three servers need. Returns executable paths plus ``kafka_libs``."""
    paths = ensure_debian_packages()
    paths["influxd"] = str(ensure_influxd())
    paths["kafka_libs"] = str(ensure_kafka_libs())
    java = shutil.which("java")
    if java is None:
        raise InstallError("java is not installed: run `apt-get install -y openjdk-17-jre-headless`")
    paths["java"] = java
    return paths
