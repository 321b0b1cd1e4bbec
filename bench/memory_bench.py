"""Memory of the API process: RSS with the base model only, after 1 tuned model has served a
request, and after `--models` (100) tuned models have each served one (their adapters all in the
Generator's cache, `TUNERY_MAX_LOADED_ADAPTERS`, 128 by default), against a real `tunery serve`.

Bench-only shortcut, so that 100 models need one training run, not 100: before the server
starts, this script creates the tuned models through the store (`TuningService.create`, the
API's own code path, with a per-key job limit high enough), trains one seed adapter with the
engine in this process (the seed tutorial's data, 5 epochs), copies its `adapter/` folder into
every other model's folder, and marks every job SUCCEEDED (`JobRepository.finish`). The server
runs with `TUNERY_WORKERS=0`, so no worker races the script for the queued jobs. Every model
then serves exactly as a trained one would; only their weights are identical.

    .venv/bin/python bench/memory_bench.py [--models 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path

import httpx
import psutil
import serve_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_bench import SEED, free_port, fresh_data_dir  # noqa: E402

MB = 1024 * 1024


def make_models(data: Path, count: int) -> list[str]:
    """`count` ACTIVE tuned models sharing one trained seed adapter (see the module doc)."""
    from tunery.engine.base_models import BaseModelRegistry
    from tunery.engine.specs import Example, TrainSpec
    from tunery.engine.train import ADAPTER_DIR, train
    from tunery.service.tuning import CreateRequest, TuningService
    from tunery.settings import Settings
    from tunery.store import Store

    settings = Settings(data_dir=data, device="cpu")
    store = Store(settings.database_url)
    registry = BaseModelRegistry(settings.models_dir, "cpu")
    tuning = TuningService(
        store, registry, settings.adapters_dir, max_unfinished_jobs_per_owner=count + 1
    )
    examples = tuple(Example(text_input=i, output=o) for i, o in SEED)
    ids = []
    for n in range(count):
        model = tuning.create(
            CreateRequest(
                base_model="models/gemma-3-270m",
                examples=examples,
                display_name=f"memory bench {n}",
                tuned_model_id=f"mem-{n:03d}",
                epoch_count=5,
                batch_size=4,
                learning_rate=0.001,
            ),
            owner=None,
        )
        ids.append(model.id)
    started = time.monotonic()
    spec = TrainSpec(epoch_count=5, batch_size=4, learning_rate=0.001)
    train(registry.load("gemma-3-270m"), examples, spec, work_dir=tuning.work_dir(ids[0]))
    print(f"seed adapter trained in {time.monotonic() - started:.1f} s (not part of any figure)")
    seed_adapter = tuning.work_dir(ids[0]) / ADAPTER_DIR
    for model_id in ids[1:]:
        shutil.copytree(seed_adapter, tuning.work_dir(model_id) / ADAPTER_DIR)
    for model_id in ids:
        model = store.models.get(model_id)
        assert model is not None and model.job is not None
        assert store.jobs.finish(model.job.id)
    store.close()
    return ids


def adapter_file_info(path: Path) -> tuple[int, dict[str, int]]:
    """Size on disk and the dtypes (tensor count each) in a safetensors header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    dtypes: dict[str, int] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + 1
    return path.stat().st_size, dtypes


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=100)
    args = parser.parse_args()

    data = fresh_data_dir()
    ids = make_models(data, args.models)
    size, dtypes = adapter_file_info(
        data / "tuned_models" / ids[0] / "adapter" / "adapter_model.safetensors"
    )
    print(f"adapter file: {size / MB:.1f} MB on disk, tensors by dtype: {dtypes}")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_WORKERS": "0"}
    env.pop("TUNERY_API_KEYS", None)
    server = serve_process.start(data, port, env)
    body = {"contents": [{"parts": [{"text": "III"}]}]}
    try:
        if not serve_process.wait_until(f"{url}/readyz", server):
            print("server did not become ready; see", data / "serve.log")
            return 1
        with httpx.Client(base_url=url, timeout=120) as http:
            http.post(
                "/v1beta/models/gemma-3-270m:generateContent",
                json={**body, "generationConfig": {"maxOutputTokens": 1}},
            ).raise_for_status()
            base_rss = rss_mb(server.pid)
            print(f"RSS, base model loaded and warmed up: {base_rss:.0f} MB")
            first_load: list[float] = []
            rss_at: dict[int, float] = {}
            for n, model_id in enumerate(ids, 1):
                t0 = time.perf_counter()
                r = http.post(f"/v1beta/tunedModels/{model_id}:generateContent", json=body)
                first_load.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                if n in (1, 10, 50) or n == len(ids):
                    rss_at[n] = rss_mb(server.pid)
                    print(f"RSS after {n:3d} tuned model(s) served: {rss_at[n]:.0f} MB")
            cached = []
            for model_id in ids[: min(20, len(ids))]:  # the oldest: evicted if the LRU is small
                t0 = time.perf_counter()
                http.post(f"/v1beta/tunedModels/{model_id}:generateContent", json=body)
                cached.append((time.perf_counter() - t0) * 1000)
            final_rss = rss_mb(server.pid)
    finally:
        serve_process.stop(server, timeout_s=60)
        shutil.rmtree(data.parent, ignore_errors=True)

    n = len(ids)
    per_adapter = (rss_at[n] - rss_at[1]) / max(1, n - 1)
    print(
        f"generate, first request per model (adapter load): p50 "
        f"{statistics.median(first_load[1:] or first_load):.0f} ms"
    )
    print(
        f"generate, the 20 oldest models again: p50 {statistics.median(cached):.0f} ms "
        f"(RSS then {final_rss:.0f} MB)"
    )
    print(f"per extra adapter in memory: {per_adapter:.1f} MB (file {size / MB:.1f} MB)")
    print(f"RSS 1 tuned model: {rss_at[1]:.0f} MB; {n} tuned models: {rss_at[n]:.0f} MB")
    print(f"ratio RSS {n}/1 tuned models: {rss_at[n] / rss_at[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
