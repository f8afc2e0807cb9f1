"""Each container image's requirement list (deploy/docker/requirements) is enough to start its service.

The images install only what their service needs (no torch in the bridge, no Faust in inference), so a
service that starts importing a library outside its list would fail in its container, but not in the
development environment, where everything is installed. This test imports each service's entry modules
in a fresh interpreter in which every installed third-party module that the image would not have is
blocked, i.e. the image's environment as far as imports go.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "deploy" / "docker" / "requirements"

#: What each image runs: its requirement list and the modules its command imports at start.
IMAGES = {
    "bridge": ("bridge", ["bpstream.cli", "bpstream.services.bridge.main", "bpstream.services.bridge.service"]),
    "processor": ("processor", ["bpstream.cli", "bpstream.services.processor.main",
                                "bpstream.services.processor.faust_app"]),
    "inference": ("inference", ["bpstream.cli", "bpstream.services.inference.main",
                                "bpstream.services.inference.service"]),
    "inference-cuda": ("inference-cuda", ["bpstream.cli", "bpstream.services.inference.main",
                                          "bpstream.services.inference.service"]),
    "alerting": ("alerting", ["bpstream.cli", "bpstream.services.alerting.main",
                              "bpstream.services.alerting.service"]),
    "writer": ("writer", ["bpstream.cli", "bpstream.services.writer.main", "bpstream.services.writer.service"]),
    "notifier": ("notifier", ["bpstream.cli", "bpstream.services.notifier.main",
                              "bpstream.services.notifier.service"]),
    "simulator": ("simulator", ["bpstream.cli", "bpstream.simulators.cli", "bpstream.simulators.fleet"]),
}

# Runs in a fresh interpreter: computes the image's distributions (its list and their dependencies),
# blocks every other installed top-level module, imports the modules, prints what it blocked.
CHECK = r'''
import importlib, importlib.metadata as md, json, re, sys
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def pins(path):
    names = set()  # (distribution, extras), e.g. ("influxdb-client", ("async",))
    for raw in path.read_text().splitlines():
        text = raw.split("#", 1)[0].strip()
        if text.startswith("-r "):
            names |= pins(path.parent / text[3:].strip())
        elif text:
            name, _, extras = text.split("==")[0].partition("[")
            names.add((norm(name), tuple(e.strip() for e in extras.rstrip("]").split(",") if e.strip())))
    return names

def wanted(requirement, extras):
    marker = requirement.partition(";")[2]
    return "extra ==" not in marker or any(re.search(rf"extra == ['\"]{e}['\"]", marker) for e in extras)

allowed, done, todo = {"bpstream"}, set(), sorted(pins(Path(sys.argv[1])))
while todo:
    name, extras = todo.pop()
    if (name, extras) in done:
        continue
    done.add((name, extras))
    allowed.add(name)
    try:
        requirements = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    todo += [(norm(re.split(r"[ <>=!~;\[(]", r, maxsplit=1)[0]), ()) for r in requirements if wanted(r, extras)]

blocked = {module for module, dists in md.packages_distributions().items()
           if not any(norm(d) in allowed for d in dists)}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not installed in this image")
        return None

sys.meta_path.insert(0, Blocker())
for module in sys.argv[2:]:
    importlib.import_module(module)
print(json.dumps(sorted(blocked)))
'''


def check(requirements: str, modules: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHECK, str(REQUIREMENTS / f"{requirements}.txt"), *modules],
                          capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_requirements_cover_the_service_imports(image: str) -> None:
    requirements, modules = IMAGES[image]
    result = check(requirements, modules)
    assert result.returncode == 0, result.stderr[-3000:]


def test_light_images_leave_out_the_heavy_libraries() -> None:
    # The check has teeth: what the bridge image leaves out is really blocked, and importing it fails.
    result = check("bridge", ["bpstream.cli"])
    assert result.returncode == 0, result.stderr[-3000:]
    blocked = set(result.stdout.split('"')[1::2])
    assert {"torch", "faust", "onnxruntime"} <= blocked
    failing = check("bridge", ["torch"])
    assert failing.returncode != 0
    assert "torch is not installed in this image" in failing.stderr
