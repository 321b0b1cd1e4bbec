"""Base classes for request and response bodies, and Google's timestamp format."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer
from pydantic.alias_generators import to_camel
from pydantic_core.core_schema import SerializerFunctionWrapHandler


class WireIn(BaseModel):
    """A request body: camelCase or snake_case keys, unknown keys ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class WireOut(BaseModel):
    """A response body: camelCase keys, `None` fields omitted."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


def rfc3339(value: datetime | None) -> str | None:
    """A timestamp as Google writes it (`2025-01-02T03:04:05.123456Z`); naive means UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Empty(WireOut):
    """`{}` (google.protobuf.Empty), e.g. for DELETE and cancel."""
