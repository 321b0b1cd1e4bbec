"""Base models: `GET models` (paged) and `GET models/{id}`, as Gemini `Model` resources."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tunery.api.deps import Owner, Svc
from tunery.api.schemas.models import ModelList, ModelResource
from tunery.errors import InvalidArgument

router = APIRouter(tags=["models"])

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@router.get("/models", response_model=ModelList)
def list_models(
    svc: Svc,
    owner: Owner,
    page_size: Annotated[int, Query(alias="pageSize")] = DEFAULT_PAGE_SIZE,
    page_token: Annotated[str, Query(alias="pageToken")] = "",
) -> ModelList:
    """The base models that can be tuned and served; `nextPageToken` only when more remain."""
    if page_size < 0:
        raise InvalidArgument("`pageSize` must be >= 0")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    start = _offset(page_token)
    infos = svc.registry.list()
    page = infos[start : start + size]
    more = start + size < len(infos)
    return ModelList(
        models=[ModelResource.from_info(i) for i in page],
        next_page_token=str(start + size) if more else None,
    )


@router.get("/models/{model_id}", response_model=ModelResource)
def get_model(model_id: str, svc: Svc, owner: Owner) -> ModelResource:
    return ModelResource.from_info(svc.inference.resolve(f"models/{model_id}", owner).base)


def _offset(page_token: str) -> int:
    if not page_token:
        return 0
    if not page_token.isdigit():
        raise InvalidArgument(f"`pageToken` {page_token!r} is not valid; pass a nextPageToken")
    return int(page_token)
