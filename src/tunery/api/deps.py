"""Request dependencies: the app's services, and who is calling (API key → owner hash).

Keys come as the `x-goog-api-key` header (what the SDKs send) or the `?key=` query parameter
(what curl samples use). With no keys configured the server is open and every caller's owner is
None. Otherwise a missing key is 401 UNAUTHENTICATED and an unknown key is 400 INVALID_ARGUMENT
with reason API_KEY_INVALID, exactly as Google answers it, so SDK users see the familiar error.
Keys are never logged; only their SHA-256 hex (the owner) is kept and compared.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, APIKeyQuery

from tunery.api.errors import InvalidApiKey
from tunery.engine.base_models import BaseModelRegistry
from tunery.errors import Unauthenticated
from tunery.service.inference import InferenceService
from tunery.service.tuning import TuningService
from tunery.settings import Settings
from tunery.store import hash_key


class Authenticator:
    """Decides who a key belongs to: configured keys plus keys the store holds (as hashes)."""

    def __init__(self, keys: Iterable[str], stored_hashes: Callable[[], Iterable[str]]) -> None:
        self._configured = frozenset(hash_key(k.strip()) for k in keys if k.strip())
        self._stored_hashes = stored_hashes

    def owner(self, key: str | None) -> str | None:
        known = self._configured | frozenset(self._stored_hashes())
        if not known:
            return None  # open access
        if not key or not key.strip():
            raise Unauthenticated(
                "This server requires an API key: pass it in the x-goog-api-key header or the "
                "key query parameter."
            )
        candidate = hash_key(key.strip())
        # Compare against every known hash so timing does not reveal which one matched.
        matched = False
        for known_hash in known:
            matched |= hmac.compare_digest(candidate, known_hash)
        if not matched:
            raise InvalidApiKey()
        return candidate


@dataclass(frozen=True)
class Services:
    """Everything a route needs, built once by the app's lifespan."""

    settings: Settings
    registry: BaseModelRegistry
    tuning: TuningService
    inference: InferenceService
    auth: Authenticator


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


_header_key = APIKeyHeader(name="x-goog-api-key", auto_error=False)
_query_key = APIKeyQuery(name="key", auto_error=False)


def get_owner(
    request: Request,
    header_key: Annotated[str | None, Security(_header_key)],
    query_key: Annotated[str | None, Security(_query_key)],
) -> str | None:
    return get_services(request).auth.owner(header_key or query_key)


Svc = Annotated[Services, Depends(get_services)]
Owner = Annotated[str | None, Depends(get_owner)]
