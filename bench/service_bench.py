"""Latency of the service path, against a real `tunery serve` subprocess on 127.0.0.1:

1. serve → ready: process start until `/healthz` answers, and until `/readyz` says the default
   base model is loaded (so the first generate pays nothing extra);
2. the seed tutorial's `tune()` (google-genai, 15 examples, 5 epochs, batch 4) until the tuned
   model is ACTIVE, on the warm server: sent once the worker has logged that its preload (base
   model, training kernels) ended, which is printed (polled every 0.2 s over REST, so the figure
   is the server's, not the SDK's polling interval);
3. generateContent "III" on the tuned model, idle server: the first request, then p50/p90 of
   `--requests` more (REST with httpx, one keep-alive connection);
4. the same p50 while a second tuning job trains (the API and worker share the cores).

The data dir is fresh (a temp dir) and links the tests' converted embedded model
(`.tunery/test-cache/base_models/gemma-3-270m`) so the ~40 s conversion is not timed; without that
cache it is converted first, untimed, by a throwaway registry call.

    .venv/bin/python bench/service_bench.py [--requests 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import serve_process
from heldout import SEED_EXAMPLES as SEED

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TUNERY_TEST_CACHE", REPO / ".tunery" / "test-cache"))
KEY = "bench-key"
BASE = "models/gemma-3-270m"
TARGET_READY_S = 5.0
TARGET_TUNE_S = 10.0
TARGET_GENERATE_MS = 150.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_data_dir() -> Path:
    data = Path(tempfile.mkdtemp(prefix="tunery-service-bench-")) / "data"
    (data / "base_models").mkdir(parents=True)
    cached = CACHE / "base_models" / "gemma-3-270m"
    if not cached.exists():
        from tunery.engine.base_models import DEFAULT_BASE_MODEL, BaseModelRegistry

        print("converting the embedded model into the test cache (once, not timed)...")
        BaseModelRegistry(CACHE / "base_models").model_dir(DEFAULT_BASE_MODEL)
    (data / "base_models" / "gemma-3-270m").symlink_to(cached)
    return data


def wait_for(check, timeout: float, server: subprocess.Popen[bytes]) -> float:  # type: ignore[no-untyped-def]
    """Seconds on the monotonic clock when `check()` first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("tunery serve exited")
        try:
            if check():
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError("timed out")


def sdk_client(url: str) -> Any:
    from google import genai
    from google.genai import types

    return genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=url))


def tune_seed(client: Any, display_name: str) -> str:
    """The tutorial's tune() call through google-genai; returns the tuned model's name."""
    from google.genai import types

    job = client.tunings.tune(
        base_model=BASE,
        training_dataset=types.TuningDataset(
            examples=[types.TuningExample(text_input=i, output=o) for i, o in SEED]
        ),
        config=types.CreateTuningJobConfig(
            epoch_count=5, batch_size=4, learning_rate=0.001, tuned_model_display_name=display_name
        ),
    )
    assert job.name and job.name.startswith("tunedModels/"), job
    return job.name  # google-genai names the job after its tuned model


def wait_active(http: httpx.Client, model: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = http.get(f"/v1beta/{model}").json()["state"]
        if state != "CREATING":
            return str(state)
        time.sleep(0.2)
    raise TimeoutError(f"{model} still CREATING")


def generate_ms(http: httpx.Client, model: str, max_tokens: int | None = None) -> tuple[float, str]:
    body: dict[str, object] = {"contents": [{"parts": [{"text": "III"}]}]}
    if max_tokens is not None:
        body["generationConfig"] = {"maxOutputTokens": max_tokens}
    t0 = time.perf_counter()
    r = http.post(f"/v1beta/{model}:generateContent", json=body)
    took = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    text = "".join(p.get("text", "") for p in r.json()["candidates"][0]["content"]["parts"])
    return took, text


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the data dir (serve.log)")
    parser.add_argument(
        "--warm-seconds",
        type=float,
        default=120,
        help="the longest wait after /readyz for the worker's preload to end (its log line)",
    )
    args = parser.parse_args()

    data = fresh_data_dir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TUNERY_API_KEYS": KEY, "HF_HUB_OFFLINE": "1"}
    t_start = time.monotonic()
    server = serve_process.start(data, port, env)
    rows: list[tuple[str, float, float, str]] = []  # what, measured, target, unit
    try:
        t_health = wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 120, server)
        readyz = httpx.get(f"{url}/readyz")
        if readyz.status_code == 404:  # a server without /readyz: ready = healthy
            t_ready = t_health
        else:
            t_ready = wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 120, server)
        rows.append(("serve -> /healthz", t_health - t_start, TARGET_READY_S, "s"))
        rows.append(
            ("serve -> /readyz (base model loaded)", t_ready - t_start, TARGET_READY_S, "s")
        )
        # A warm server: the worker preloads after the API (base model, training kernels) and
        # logs "worker ...: preloaded"; a tune() sent before that waits for the preload.
        log = data / "serve.log"
        worker_preloaded = re.compile(r"tunery\.worker: worker \S+: preloaded ")
        t_warm = wait_for(
            lambda: worker_preloaded.search(log.read_text()) is not None, args.warm_seconds, server
        )
        print(f"worker preloaded {t_warm - t_ready:.2f} s after /readyz")

        with httpx.Client(base_url=url, headers={"x-goog-api-key": KEY}, timeout=600) as http:
            client = sdk_client(url)  # imported and built before the clock starts
            t0 = time.monotonic()
            model = tune_seed(client, "bench seed")
            t_created = time.monotonic()
            state = wait_active(http, model)
            t_active = time.monotonic()
            print(
                f"tune(): created in {(t_created - t0) * 1000:.0f} ms; {state} after "
                f"{t_active - t0:.2f} s"
            )
            if state != "ACTIVE":
                print((data / "serve.log").read_text()[-3000:])
                return 1
            rows.append(("seed tune() -> ACTIVE (warm server)", t_active - t0, TARGET_TUNE_S, "s"))

            first, text = generate_ms(http, model)
            print(f"generate 'III' -> {text!r}; first request {first:.0f} ms (loads the adapter)")
            idle = [generate_ms(http, model)[0] for _ in range(args.requests)]
            print(
                f"generate 'III', idle: p50 {p(idle, 50):.0f} ms, p90 {p(idle, 90):.0f} ms, "
                f"min {min(idle):.0f} ms over {len(idle)}"
            )
            base_idle = [generate_ms(http, BASE, 4)[0] for _ in range(max(5, args.requests // 2))]
            print(
                f"generate 'III' on the base model (4 tokens), idle: p50 {p(base_idle, 50):.0f} ms"
            )
            rows.append(("generate 'III' p50, idle server", p(idle, 50), TARGET_GENERATE_MS, "ms"))

            # The same while a second (longer) job trains: the API and worker share the cores.
            second = tune_seed(client, "bench busy")
            busy_start = time.monotonic()
            while (
                http.get(f"/v1beta/{second}").json().get("tuningTask", {}).get("snapshots") is None
                and time.monotonic() - busy_start < 30
            ):
                time.sleep(0.1)
            busy = []
            for _ in range(args.requests):
                if http.get(f"/v1beta/{second}").json()["state"] != "CREATING":
                    break
                busy.append(generate_ms(http, model)[0])
            if len(busy) >= 3:
                print(
                    f"generate 'III' while a job trains: p50 {p(busy, 50):.0f} ms over {len(busy)}"
                )
            wait_active(http, second)
    finally:
        serve_process.stop(server)
        if args.keep:
            print("data dir:", data)
        else:
            shutil.rmtree(data.parent, ignore_errors=True)

    print()
    print(f"{'what':42s} {'measured':>10s} {'target':>10s}")
    worst = 0.0
    for what, value, target, unit in rows:
        print(f"{what:42s} {value:>8.2f} {unit:2s} {target:>7.1f} {unit}")
        worst = max(worst, value / target)
    verdict = "all targets met" if worst <= 1.0 else "over target"
    print(f"ratio worst measured/target: {worst:.2f} ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
