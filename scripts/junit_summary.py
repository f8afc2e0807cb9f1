"""Add up pytest's JUnit XML reports into one closing line: ``tests: N passed, N failed, N skipped``.

Exit status 1 when a report is missing, any test failed or errored, or no test ran at all.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(paths: list[str]) -> int:
    passed = failed = skipped = 0
    ok = True
    for path in paths:
        if not Path(path).exists():
            print(f"  {path}: missing (that stage did not run to the end)")
            ok = False
            continue
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            tests, fails = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skips = int(suite.get("skipped", 0))
            passed += tests - fails - skips
            failed += fails
            skipped += skips
            print(f"  {Path(path).stem:<12} {tests - fails - skips} passed, {fails} failed, {skips} skipped")
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if ok and failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
