"""generateContent, streamGenerateContent and countTokens for `models/*` and `tunedModels/*`.

Only text is supported. A base model sees every turn's text joined by newlines (after the
system instruction, if any); a tuned model was trained on single input→output pairs, so it gets
the text of the last user turn as its input and rejects system instructions and JSON mode.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tunery.api.deps import Owner, Services, Svc
from tunery.api.errors import error_body, internal_error
from tunery.api.schemas.generate import (
    ContentIn,
    CountTokensRequest,
    CountTokensResponse,
    GenerateContentRequest,
    GenerateContentResponse,
)
from tunery.engine.specs import GenerationParams, StreamChunk
from tunery.errors import InvalidArgument, TuneryError
from tunery.service.inference import Resolved

log = logging.getLogger(__name__)
router = APIRouter(tags=["generation"])

Alt = Annotated[str | None, Query(description="`sse` for server-sent events")]


# --- routes: one thin pair per collection so OpenAPI names both ----------------------------


@router.post("/models/{model_id}:generateContent", response_model=GenerateContentResponse)
def generate_base(
    model_id: str, body: GenerateContentRequest, svc: Svc, owner: Owner
) -> GenerateContentResponse:
    return _generate(f"models/{model_id}", body, svc, owner)


@router.post("/tunedModels/{model_id}:generateContent", response_model=GenerateContentResponse)
def generate_tuned(
    model_id: str, body: GenerateContentRequest, svc: Svc, owner: Owner
) -> GenerateContentResponse:
    return _generate(f"tunedModels/{model_id}", body, svc, owner)


@router.post("/models/{model_id}:streamGenerateContent")
async def stream_base(
    model_id: str, body: GenerateContentRequest, svc: Svc, owner: Owner, alt: Alt = None
) -> StreamingResponse:
    return await _stream(f"models/{model_id}", body, svc, owner, alt)


@router.post("/tunedModels/{model_id}:streamGenerateContent")
async def stream_tuned(
    model_id: str, body: GenerateContentRequest, svc: Svc, owner: Owner, alt: Alt = None
) -> StreamingResponse:
    return await _stream(f"tunedModels/{model_id}", body, svc, owner, alt)


@router.post("/models/{model_id}:countTokens", response_model=CountTokensResponse)
def count_base(
    model_id: str, body: CountTokensRequest, svc: Svc, owner: Owner
) -> CountTokensResponse:
    return _count(f"models/{model_id}", body, svc, owner)


@router.post("/tunedModels/{model_id}:countTokens", response_model=CountTokensResponse)
def count_tuned(
    model_id: str, body: CountTokensRequest, svc: Svc, owner: Owner
) -> CountTokensResponse:
    return _count(f"tunedModels/{model_id}", body, svc, owner)


# --- the work ------------------------------------------------------------------------------


def _generate(
    model: str, body: GenerateContentRequest, svc: Services, owner: str | None
) -> GenerateContentResponse:
    resolved = svc.inference.resolve(model, owner)
    prompt, params = prompt_of(body, resolved), params_of(body, resolved)
    generation = svc.inference.generate(resolved, owner, prompt, params)
    return GenerateContentResponse.from_generation(generation, resolved.name, _response_id())


async def _stream(
    model: str, body: GenerateContentRequest, svc: Services, owner: str | None, alt: str | None
) -> StreamingResponse:
    """SSE with `alt=sse` (google-genai), else one JSON array written piece by piece (GAPIC).

    Resolving and validating (the store, the tokenizer, loading an adapter) run on a worker
    thread and fail before a response starts, so bad input is an error status, not a 200. The
    pieces then come to this loop (the batch scheduler's) or from worker threads (the rest)."""
    name, chunks = await run_in_threadpool(_open_stream, model, body, svc, owner)
    stream = chunks if isinstance(chunks, AsyncGenerator) else _in_threads(chunks)
    pieces = _pieces(stream, name, _response_id())
    if alt == "sse":
        return StreamingResponse(
            (f"data: {b}\n\n" async for b in pieces), media_type="text/event-stream"
        )
    return StreamingResponse(_json_array(pieces), media_type="application/json")


def _open_stream(
    model: str, body: GenerateContentRequest, svc: Services, owner: str | None
) -> tuple[str, AsyncGenerator[StreamChunk, None] | Iterator[StreamChunk]]:
    resolved = svc.inference.resolve(model, owner)
    prompt, params = prompt_of(body, resolved), params_of(body, resolved)
    return resolved.name, svc.inference.stream_async(resolved, owner, prompt, params)


def _count(
    model: str, body: CountTokensRequest, svc: Services, owner: str | None
) -> CountTokensResponse:
    request = body.generate_content_request or GenerateContentRequest(contents=body.contents)
    resolved = svc.inference.resolve(model, owner)
    total = svc.inference.count_tokens(resolved, owner, prompt_of(request, resolved))
    return CountTokensResponse(total_tokens=total)


async def _in_threads(chunks: Iterator[StreamChunk]) -> AsyncGenerator[StreamChunk, None]:
    """A blocking stream, each next piece awaited on a worker thread; closed on a thread too,
    however the caller stops (a client gone cancels us), which frees its model lock."""
    try:
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)


async def _pieces(
    chunks: AsyncGenerator[StreamChunk, None], model: str, response_id: str
) -> AsyncGenerator[str, None]:
    """Each chunk as one line of JSON; an error mid-stream becomes a final `{"error": ...}`."""
    try:
        async for chunk in chunks:
            out = GenerateContentResponse.from_chunk(chunk, model, response_id)
            yield out.model_dump_json(by_alias=True)
    except TuneryError as exc:
        yield json.dumps({"error": error_body(exc)})
    except Exception:
        log.exception("stream on %s failed", model)
        yield json.dumps({"error": error_body(internal_error())})
    finally:
        # A client that went away closes us; close the engine's stream too, freeing its row.
        with anyio.CancelScope(shield=True):
            await chunks.aclose()


async def _json_array(bodies: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    yield "["
    first = True
    async for b in bodies:
        yield ("" if first else ",\n") + b
        first = False
    yield "]"


def _response_id() -> str:
    return uuid.uuid4().hex[:20]


# --- request → engine inputs ---------------------------------------------------------------


def prompt_of(body: GenerateContentRequest, resolved: Resolved) -> str:
    """The text the engine sees (see the module docstring for base vs tuned)."""
    if not body.contents:
        raise InvalidArgument("contents is required: send at least one user turn with text")
    turns = [_text_of(c, f"contents[{i}]") for i, c in enumerate(body.contents)]
    if resolved.tuned is not None:
        if body.system_instruction is not None:
            raise InvalidArgument(
                f"Developer instruction (systemInstruction) is not enabled for {resolved.name}: "
                "tuned models do not support system instructions"
            )
        user_turns = [t for t, c in zip(turns, body.contents, strict=True) if c.role != "model"]
        if not user_turns:
            raise InvalidArgument("contents has no user turn for the tuned model to answer")
        return user_turns[-1]
    prompt = "\n".join(turns)
    if body.system_instruction is not None:
        prompt = _text_of(body.system_instruction, "systemInstruction") + "\n\n" + prompt
    return prompt


def _text_of(content: ContentIn, where: str) -> str:
    if content.role not in (None, "", "user", "model"):
        raise InvalidArgument(f"{where}.role must be 'user' or 'model', not {content.role!r}")
    if not content.parts:
        raise InvalidArgument(f"{where}.parts must not be empty")
    texts = []
    for j, part in enumerate(content.parts):
        if part.model_extra:
            kinds = ", ".join(sorted(part.model_extra))
            raise InvalidArgument(f"{where}.parts[{j}]: only text parts are supported, not {kinds}")
        if part.text is None:
            raise InvalidArgument(f"{where}.parts[{j}] has no text")
        texts.append(part.text)
    return "".join(texts)


def params_of(body: GenerateContentRequest, resolved: Resolved) -> GenerationParams:
    """Decoding settings: the request's, else the (tuned) model's defaults."""
    cfg = body.generation_config
    if cfg is None:
        return GenerationParams(
            temperature=resolved.default_temperature,
            top_p=resolved.default_top_p,
            top_k=resolved.default_top_k,
        )
    json_mode = cfg.response_mime_type not in (None, "", "text/plain")
    if json_mode or cfg.response_schema is not None or cfg.response_json_schema is not None:
        if resolved.tuned is not None:
            raise InvalidArgument("JSON mode is not supported with tuned models")
        raise InvalidArgument(
            f"{resolved.name} supports only text output: responseMimeType "
            f"{cfg.response_mime_type!r} and response schemas are not supported"
        )
    given: dict[str, Any] = {
        "temperature": _or(cfg.temperature, resolved.default_temperature),
        "top_p": _or(cfg.top_p, resolved.default_top_p),
        "top_k": _or(cfg.top_k, resolved.default_top_k),
        "stop_sequences": tuple(cfg.stop_sequences or ()),
        "seed": cfg.seed,
    }
    if cfg.max_output_tokens is not None:
        given["max_output_tokens"] = cfg.max_output_tokens
    if cfg.candidate_count is not None:
        given["candidate_count"] = cfg.candidate_count
    return GenerationParams(**given)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
