"""Load: 50 concurrent clients mixing generate, list and get against a real `tunery serve` on
127.0.0.1, while 3 tuning jobs queue up at once; then a 4th job over the per-key limit.

Prints p50/p99 per kind of request and fails (exit 1) on any failed request, on jobs that did not
start in the order they were queued, or on a missing 429. Bounded: --seconds of load, then the
queue is given --drain-seconds to empty.

    .venv/bin/python bench/load_bench.py --seconds 30
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import serve_process

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key"
BASE = "models/gemma-3-270m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tuning_body(i: int) -> dict[str, object]:
    examples = [{"textInput": f"job {i} item {j}", "output": f"answer {j}"} for j in range(4)]
    return {
        "displayName": f"load job {i}",
        "baseModel": BASE,
        "tuningTask": {
            "hyperparameters": {"epochCount": 1, "batchSize": 2},
            "trainingData": {"examples": {"examples": examples}},
        },
    }


def client_loop(
    url: str, stop: float, results: dict[str, list[float]], failures: list[str]
) -> None:
    headers = {"x-goog-api-key": KEY}
    rng = random.Random(threading.get_ident())
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        while time.monotonic() < stop:
            kind = rng.choice(["generate", "list", "list", "get", "get"])
            t0 = time.perf_counter()
            try:
                if kind == "generate":
                    r = http.post(
                        f"/v1beta/{BASE}:generateContent",
                        json={
                            "contents": [{"parts": [{"text": "Say hi"}]}],
                            "generationConfig": {"maxOutputTokens": 4},
                        },
                    )
                elif kind == "list":
                    r = http.get("/v1beta/tunedModels", params={"pageSize": 5})
                else:
                    r = http.get(f"/v1beta/{BASE}")
                if r.status_code != 200:
                    failures.append(f"{kind}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                failures.append(f"{kind}: {type(e).__name__}: {e}")
                continue
            results.setdefault(kind, []).append(time.perf_counter() - t0)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--drain-seconds", type=float, default=600)
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="tunery-load-"))
    cache = REPO / ".tunery" / "test-cache" / "base_models" / "gemma-3-270m"
    if cache.exists():  # reuse the tests' converted embedded model
        (data / "base_models").mkdir()
        (data / "base_models" / "gemma-3-270m").symlink_to(cache)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TUNERY_API_KEYS": f"{KEY},other-key",
        "TUNERY_MAX_RUNNING_JOBS_PER_KEY": "3",
        "TUNERY_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    server = serve_process.start(data, port, env)
    failures: list[str] = []
    try:
        if not serve_process.wait_until(f"{url}/healthz", server):
            print("server did not start; see", data / "serve.log")
            return 1

        headers = {"x-goog-api-key": KEY}
        jobs = []
        for i in range(3):
            r = httpx.post(f"{url}/v1beta/tunedModels", json=tuning_body(i), headers=headers)
            r.raise_for_status()
            jobs.append(r.json()["metadata"]["tunedModel"])
        over = httpx.post(f"{url}/v1beta/tunedModels", json=tuning_body(3), headers=headers)
        limit_ok = over.status_code == 429 and "RESOURCE_EXHAUSTED" in over.text
        print(f"4th job for the same key: {over.status_code} {over.json()['error']['message']}")

        results: dict[str, list[float]] = {}
        stop = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=client_loop, args=(url, stop, results, failures))
            for _ in range(args.clients)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        total = sum(len(v) for v in results.values())
        print(
            f"{args.clients} clients, {elapsed:.0f} s: {total} requests ({total / elapsed:.1f}/s)"
        )
        for kind, times in sorted(results.items()):
            print(
                f"  {kind:9s} n={len(times):5d}  p50={percentile(times, 50) * 1000:8.1f} ms"
                f"  p99={percentile(times, 99) * 1000:8.1f} ms"
            )
        print(f"failed requests: {len(failures)}")
        for f in failures[:10]:
            print("  ", f)

        drain = time.monotonic() + args.drain_seconds
        models: list[dict[str, object]] = []
        while time.monotonic() < drain:
            models = [httpx.get(f"{url}/v1beta/{m}", headers=headers).json() for m in jobs]
            if all(m["state"] != "CREATING" for m in models):
                break
            time.sleep(1)
        states = [m["state"] for m in models]
        starts = [m.get("tuningTask", {}).get("startTime", "") for m in models]  # type: ignore[union-attr]
        in_order = starts == sorted(starts) and all(starts)
        print(f"tuning jobs: {states}; started in queue order: {in_order}")
        ok = not failures and limit_ok and in_order and all(s == "ACTIVE" for s in states)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        serve_process.stop(server, timeout_s=90)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
