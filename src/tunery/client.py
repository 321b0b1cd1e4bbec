"""A small HTTP client for a running Tunery server (what `tunery ... --server URL` uses).

Speaks the same /v1beta REST surface as the Gemini SDKs; errors come back as TuneryError with the
server's own message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from tunery.engine.specs import GenerationParams
from tunery.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TuneryError,
    Unauthenticated,
    Unavailable,
)
from tunery.service.tuning import CreateRequest

_BY_STATUS: dict[int, type[TuneryError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: AlreadyExists,
    429: ResourceExhausted,
    503: Unavailable,
}


class TuneryClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600) -> None:
        headers = {"x-goog-api-key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/v1beta/", headers=headers, timeout=timeout
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the server: {exc}") from None
        return _json_or_raise(response)

    def create_tuned_model(self, req: CreateRequest) -> dict[str, Any]:
        """POST tunedModels with the request as the Gemini REST body; returns the Operation."""
        base = req.base_model
        hyperparameters = {
            "epochCount": req.epoch_count,
            "batchSize": req.batch_size,
            "learningRate": req.learning_rate,
            "learningRateMultiplier": req.learning_rate_multiplier,
        }
        body = {
            "baseModel": base if base.startswith("models/") else f"models/{base}",
            "displayName": req.display_name,
            "description": req.description,
            "tuningTask": {
                "hyperparameters": {k: v for k, v in hyperparameters.items() if v is not None},
                "trainingData": {
                    "examples": {
                        "examples": [
                            {"textInput": e.text_input, "output": e.output} for e in req.examples
                        ]
                    }
                },
            },
        }
        params = {"tunedModelId": req.tuned_model_id} if req.tuned_model_id else {}
        return self._call("POST", "tunedModels", json=body, params=params)

    def get_operation(self, name: str) -> dict[str, Any]:
        return self._call("GET", name)

    def list_models(self) -> list[dict[str, Any]]:
        return list(self._paged("models", "models"))

    def list_tuned_models(self) -> list[dict[str, Any]]:
        return list(self._paged("tunedModels", "tunedModels"))

    def _paged(self, path: str, key: str) -> Iterator[dict[str, Any]]:
        token = ""
        while True:
            params = {"pageSize": 100, **({"pageToken": token} if token else {})}
            page = self._call("GET", path, params=params)
            yield from page.get(key, [])
            token = page.get("nextPageToken", "")
            if not token:
                return

    def generate(self, model: str, prompt: str, params: GenerationParams) -> dict[str, Any]:
        return self._call(
            "POST", f"{_model_path(model)}:generateContent", json=_body(prompt, params)
        )

    def stream(self, model: str, prompt: str, params: GenerationParams) -> Iterator[dict[str, Any]]:
        path = f"{_model_path(model)}:streamGenerateContent"
        with self._http.stream(
            "POST", path, params={"alt": "sse"}, json=_body(prompt, params)
        ) as response:
            if response.status_code != 200:
                response.read()
                _json_or_raise(response)
            for line in response.iter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[len("data: ") :])


def _model_path(model: str) -> str:
    return model if model.startswith(("models/", "tunedModels/")) else f"tunedModels/{model}"


def _body(prompt: str, params: GenerationParams) -> dict[str, Any]:
    config: dict[str, Any] = {
        "temperature": params.temperature,
        "topP": params.top_p,
        "maxOutputTokens": params.max_output_tokens,
        "candidateCount": params.candidate_count,
    }
    if params.top_k:
        config["topK"] = params.top_k
    if params.stop_sequences:
        config["stopSequences"] = list(params.stop_sequences)
    if params.seed is not None:
        config["seed"] = params.seed
    return {"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": config}


def _json_or_raise(response: httpx.Response) -> dict[str, Any]:
    try:
        data: dict[str, Any] = response.json()
    except ValueError:
        data = {"error": {"message": response.text or response.reason_phrase}}
    if response.status_code == 200:
        return data
    message = data.get("error", {}).get("message") or response.reason_phrase
    raise _BY_STATUS.get(response.status_code, TuneryError)(message)
