"""mypy as a ratchet (``make lint``): each module's error count may only go down.

mypy runs strict over notifyctl/, worker/, campaigns/, sandboxes/, bench/ and chaos/
(``[tool.mypy]`` in pyproject.toml). The errors it finds today are counted per module in
tests/typecheck_baseline.json; a module with more errors than its count (or a module not listed, with any) fails, naming the new errors. A module
with fewer passes and says so: run ``python tests/typecheck.py --update`` to lower the baseline
in the same commit. Never raise a count by hand. Once the baseline is empty (``{}``), any mypy error
fails: mypy must pass outright.

    python tests/typecheck.py            # check against the baseline
    python tests/typecheck.py --update   # write today's counts (refuses to raise any)
    python tests/typecheck.py --update --accept-new   # only when merging work written before the
                                         # ratchet existed: takes its errors into the baseline
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "tests" / "typecheck_baseline.json"
ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):\d+(?::\d+)?: error: ")


def run_mypy() -> tuple[Counter[str], dict[str, list[str]], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    counts: Counter[str] = Counter()
    lines: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        m = ERROR.match(line)
        if m:
            counts[m["path"]] += 1
            lines.setdefault(m["path"], []).append(line)
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not counts):
        raise SystemExit(f"mypy did not run (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return counts, lines, proc.stdout


def main(argv: list[str]) -> int:
    counts, lines, _ = run_mypy()
    baseline: dict[str, int] = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    worse = {p: n for p, n in counts.items() if n > baseline.get(p, 0)}
    better = {p: n for p, n in baseline.items() if counts.get(p, 0) < n}
    if "--update" in argv:
        if worse and BASELINE.exists() and "--accept-new" not in argv:
            print("refusing to raise the baseline for: " + ", ".join(sorted(worse)), file=sys.stderr)
            return 1
        BASELINE.write_text(json.dumps(dict(sorted(counts.items())), indent=1) + "\n")
        print(f"baseline: {sum(counts.values())} errors in {len(counts)} modules")
        return 0
    for path in sorted(worse):
        print(f"{path}: {counts[path]} mypy errors, the baseline allows {baseline.get(path, 0)}:")
        for line in lines[path]:
            print("  " + line)
    if worse:
        print("mypy: fix the new errors above (tests/typecheck.py); the baseline only goes down", file=sys.stderr)
        return 1
    if better:
        print(
            "mypy: fewer errors than the baseline in "
            + ", ".join(f"{p} ({baseline[p]} → {counts.get(p, 0)})" for p in sorted(better))
            + "; lower it with `python tests/typecheck.py --update`"
        )
    print(f"mypy: {sum(counts.values())} errors, none above the baseline ({sum(baseline.values())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
