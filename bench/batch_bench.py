"""Many tuned models, one base: 32 concurrent streams spread over 8 tuned models against a real
`tunery serve` on 127.0.0.1 (continuous batching), and as the baseline the same requests one at
a time, in the same run on the same server.

The 8 models are tuned through the API for 1 epoch each on 16 counting examples ("count from 7"
→ "7, 8, 9, …", 64 numbers), so they are real, distinct adapters whose answers run long: each
request streams (`alt=sse`) "count from N" with `maxOutputTokens` (64). Tokens/s counts the
tokens the server reports generating (`usageMetadata.candidatesTokenCount`), whatever made a
request stop; the tokens per request are printed. The load generator (`sse_load.py`: one
asyncio loop, a keep-alive connection per stream) shares the cores with the server, so its CPU
time is printed too.

    .venv/bin/python bench/batch_bench.py [--streams 32] [--models 8] [--max-tokens 64]

The batched load (a few seconds) runs `--repeats` times (5) and its median counts: one run
of it varied by +-5% on the Xeon VM, run after run; the median of several is steadier.

`--keep` keeps the data dir; `--data-dir DIR` serves that kept dir again with its tuned bench
models and no training worker (whose preload would share the cores with the measurement), which
spares the tuning on a slow CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
import serve_process
from sse_load import run_load

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_bench import free_port, fresh_data_dir  # noqa: E402

PROMPTS = [f"count from {n}" for n in (3, 17, 42, 105)]


def counting(start: int) -> str:
    return ", ".join(str(i) for i in range(start, start + 64))


def tune_models(http: httpx.Client, count: int, can_tune: bool = True) -> list[str]:
    """`count` tuned models via the API (1 epoch of the seed data each), waited until ACTIVE:
    the bench's models the data dir already has, then new ones."""
    examples = [{"textInput": f"count from {n}", "output": counting(n)} for n in range(5, 200, 12)]
    listed = http.get("/v1beta/tunedModels", params={"pageSize": 100}).json()
    names = [
        m["name"]
        for m in listed.get("tunedModels", [])
        if m.get("displayName", "").startswith("batch bench ") and m.get("state") == "ACTIVE"
    ][:count]
    if len(names) < count and not can_tune:
        raise SystemExit(f"the data dir has {len(names)} ACTIVE bench models, not {count}")
    for n in range(len(names), count):
        body = {
            "displayName": f"batch bench {n}",
            "baseModel": "models/gemma-3-270m",
            "tuningTask": {
                "hyperparameters": {"epochCount": 1, "batchSize": 4, "learningRate": 0.001},
                "trainingData": {"examples": {"examples": examples}},
            },
        }
        r = http.post("/v1beta/tunedModels", json=body)
        r.raise_for_status()
        names.append(r.json()["metadata"]["tunedModel"])
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        states = [http.get(f"/v1beta/{m}").json()["state"] for m in names]
        if all(s == "ACTIVE" for s in states):
            return names
        if "FAILED" in states:
            raise RuntimeError(f"a tuning job failed: {states}")
        time.sleep(1)
    raise TimeoutError("tuning did not finish")


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="batched loads; the median counts")
    parser.add_argument(
        "--generation-config",
        type=json.loads,
        default=None,
        help="JSON joined to each request's generationConfig, e.g. "
        '\'{"temperature": 1, "topK": 64}\' (sampled streams)',
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir and serve.log")
    parser.add_argument("--data-dir", type=Path, help="a data dir kept by --keep: serve it again")
    args = parser.parse_args()

    data = args.data_dir or fresh_data_dir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_MAX_RUNNING_JOBS_PER_KEY": "100"}
    env.pop("TUNERY_API_KEYS", None)
    if args.data_dir:
        env["TUNERY_WORKERS"] = "0"  # nothing to tune
    server = serve_process.start(data, port, env)
    try:
        if not serve_process.wait_until(f"{url}/readyz", server):
            print("server did not become ready; see", data / "serve.log")
            return 1
        with httpx.Client(base_url=url, timeout=600) as http:
            t0 = time.monotonic()
            models = tune_models(http, args.models, can_tune=not args.data_dir)
            print(f"{len(models)} tuned models ACTIVE in {time.monotonic() - t0:.0f} s (untimed)")
        # Load every adapter once, so neither side pays for it.
        run_load(url, [(m, "Hello") for m in models], len(models), 2)
        jobs = [(models[k % len(models)], PROMPTS[k % len(PROMPTS)]) for k in range(args.streams)]

        cpu0 = time.process_time()
        rates, lat, tokens = [], [], 0
        for _ in range(max(1, args.repeats)):
            wall, lat_one, tokens_one = run_load(
                url, jobs, args.streams, args.max_tokens, args.generation_config
            )
            rates.append(tokens_one / wall)
            lat += lat_one
            tokens += tokens_one
        client_cpu = (time.process_time() - cpu0) / len(rates)
        batched = statistics.median(rates)
        print(
            f"batched:    {args.streams} concurrent streams over {len(models)} models, "
            f"{len(rates)} runs: median {batched:.0f} tok/s "
            f"({', '.join(f'{r:.0f}' for r in rates)}); latency p50 "
            f"{pct(lat, 50):.2f} s, p99 {pct(lat, 99):.2f} s; "
            f"{tokens / len(lat):.0f} tokens/request; load generator CPU {client_cpu:.2f} s a run"
        )
        wall1, lat1, tokens1 = run_load(url, jobs, 1, args.max_tokens, args.generation_config)
        serial = tokens1 / wall1
        print(
            f"one at a time: the same {len(jobs)} requests: {tokens1} tokens in {wall1:.1f} s = "
            f"{serial:.0f} tok/s; latency p50 {pct(lat1, 50):.2f} s, p99 {pct(lat1, 99):.2f} s"
        )
        print(f"target: >= 1000 tok/s aggregate; measured {batched:.0f}")
        print(f"ratio batched/one-at-a-time tok/s: {batched / serial:.2f}")
        return 0
    finally:
        serve_process.stop(server, timeout_s=60)
        if args.keep or args.data_dir:
            print("data dir kept:", data)
        else:
            shutil.rmtree(data.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
