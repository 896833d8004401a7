"""gpu_check.sh's verdict on its GPU test run: pytest's exit status and its ``-rs`` summary give one
line and a status, so that "no tests collected" and "tests skipped for a missing package" are never
reported as ok.

    python benchmarks/gpu_verdict.py RC PYTEST_OUTPUT_FILE

prints ``pytest: ...`` and exits with the step's status: 0 every selected test ran and passed;
RC (5 included: nothing collected means nothing was checked) when pytest failed; ``NOT_RUN`` (6) when
everything that ran passed but some selected tests skipped (tensorrt, bitsandbytes... missing).
Standard library only: it runs wherever gpu_check.sh does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

NOT_RUN = 6
NO_TESTS = 5  # pytest's own status for "no tests collected"
_SKIP = re.compile(r"^SKIPPED \[(\d+)\] [^\s:]+(?::\d+)?: (.*)$", re.M)
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped)")


def pytest_verdict(rc: int, output: str) -> tuple[int, str]:
    """(status, line) for pytest's exit status ``rc`` and its output (run with ``-rs``)."""
    counts: dict[str, int] = {}
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", line)]
    for n, what in _COUNT.findall(summary[-1] if summary else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    ran = ", ".join(f"{n} {what}" for what, n in counts.items()) or "nothing ran"
    if rc == NO_TESTS:
        return rc, "pytest: FAILED: no tests collected (exit 5): nothing was checked on the GPU"
    if rc == 124:
        return rc, f"pytest: FAILED: timed out (exit 124; {ran})"
    if rc != 0 or counts.get("failed") or counts.get("error"):  # the summary line counts too
        return rc or 1, f"pytest: FAILED (exit {rc}; {ran})"
    skips = _SKIP.findall(output)
    if skips or counts.get("skipped"):
        n = sum(int(c) for c, _ in skips) or counts.get("skipped", 0)
        reasons = "; ".join(dict.fromkeys(reason.strip() for _, reason in skips)) or "see pytest_gpu.txt"
        return NOT_RUN, f"pytest: NOT RUN: {n} selected test(s) skipped ({reasons}); {ran}"
    return 0, f"pytest: ok ({ran})"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python benchmarks/gpu_verdict.py RC PYTEST_OUTPUT_FILE", file=sys.stderr)
        return 2
    path = Path(args[1])
    status, line = pytest_verdict(int(args[0]), path.read_text(errors="replace") if path.is_file() else "")
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
