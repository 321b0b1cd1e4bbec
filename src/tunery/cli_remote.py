"""CLI commands against a running server (`--server URL`): submit, follow progress, generate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from tunery.client import TuneryClient
from tunery.engine.specs import GenerationParams
from tunery.errors import FailedPrecondition
from tunery.service.tuning import CreateRequest

Progress = tuple[int, int, int | None, float | None]
POLL_SECONDS = 0.5


def tune_remote(
    server: str,
    api_key: str | None,
    request: CreateRequest,
    show: Callable[[Iterator[Progress]], None],
) -> str:
    """Submit a tuning job and follow its operation until done; returns the tuned model name."""
    client = TuneryClient(server, api_key)
    operation = client.create_tuned_model(request)
    final: dict[str, Any] = {}

    def follow() -> Iterator[Progress]:
        op = operation
        while True:
            meta = op.get("metadata", {})
            snaps = meta.get("snapshots") or [{}]
            yield (
                int(meta.get("completedSteps", 0)),
                int(meta.get("totalSteps", 0)),
                snaps[-1].get("epoch"),
                snaps[-1].get("meanLoss"),
            )
            if op.get("done"):
                final.update(op)
                return
            time.sleep(POLL_SECONDS)
            op = client.get_operation(operation["name"])

    show(follow())
    if "error" in final:
        raise FailedPrecondition(f"tuning failed: {final['error'].get('message', 'unknown error')}")
    name: str = final.get("response", {}).get("name") or operation["metadata"]["tunedModel"]
    return name


def generate_remote(
    server: str,
    api_key: str | None,
    model: str,
    prompt: str,
    params: GenerationParams,
    stream: bool,
) -> Iterator[str]:
    client = TuneryClient(server, api_key)
    chunks = (
        client.stream(model, prompt, params) if stream else [client.generate(model, prompt, params)]
    )
    for chunk in chunks:
        for candidate in chunk.get("candidates", [])[:1]:
            for part in candidate.get("content", {}).get("parts", []):
                yield part.get("text", "")


def list_remote(server: str, api_key: str | None) -> list[tuple[str, ...]]:
    client = TuneryClient(server, api_key)
    rows: list[tuple[str, ...]] = [
        (m["name"], "base", "ACTIVE", "", m.get("displayName", "")) for m in client.list_models()
    ]
    rows += [
        (m["name"], "tuned", m.get("state", ""), m.get("baseModel", ""), m.get("displayName", ""))
        for m in client.list_tuned_models()
    ]
    return rows
