"""A long schemathesis run over the server's own OpenAPI spec (CI runs a short one in
tests/integration/test_hostile_input.py). Prints cases per operation and every failure.

    .venv/bin/python bench/fuzz_bench.py --examples 200 [--random]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fuzz_api import fuzz  # noqa: E402
from live_server import live_server  # noqa: E402

from tunery.settings import Settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=200, help="cases per operation")
    parser.add_argument("--random", action="store_true", help="a new seed each run")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="tunery-fuzz-"))
    settings = Settings(data_dir=data, device="cpu", threads=1, max_request_bytes=1_000_000)
    t0 = time.monotonic()
    with live_server(settings) as server:
        report = fuzz(server.url, args.examples, seed=None if args.random else 0)
    for label, n in sorted(report.by_operation.items()):
        print(f"{n:6d}  {label}")
    print(f"{report.cases} cases in {time.monotonic() - t0:.0f} s; {len(report.failures)} failures")
    for failure in report.failures:
        print("-", failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
