"""The models of each provider that lists none in config.toml: its own `GET /models`, read
in the background at start-up and every `models_refresh_s`, for `GET /v1/models` to list.

A provider that does not answer is left out (its last good list stays); nothing here is on
a turn's path, and routing never depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import msgspec

from llmgate import http
from llmgate.errors import ApiError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from llmgate.upstream.provider import Provider
from llmgate.upstream.router import Router

log = logging.getLogger("llmgate.upstream")

MAX_BODY = 4 * 2**20
MAX_MODELS = 1000
_TIMEOUT = aiohttp.ClientTimeout(total=10)


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model]


_decoder = msgspec.json.Decoder(_ModelList)


async def ask(
    session: aiohttp.ClientSession,
    provider: Provider,
    method: str,
    url: Any,
    limit: int,
    timeout: aiohttp.ClientTimeout = _TIMEOUT,
    data: bytes | None = None,
) -> bytes:
    """A JSON request to a provider outside a turn (its model list, a probe): the body,
    bounded; a non-2xx answer (a redirect too: our key goes nowhere else) or a failed
    connection as the provider's ApiError."""
    try:
        return await http.fetch(
            session, method, url, limit, headers=provider.headers(False, None),
            timeout=timeout, data=data,
        )
    except http.HttpError as exc:
        raise _error(provider, exc) from None


def _error(provider: Provider, exc: http.HttpError) -> UpstreamError:
    if isinstance(exc, http.StatusError):
        return provider.status_error(exc.status, exc.headers, exc.body)
    said = f"provider '{provider.name}' {exc}"
    return UpstreamTimeout(said) if isinstance(exc, http.TimedOut) else UpstreamUnavailable(said)


async def models_of(session: aiohttp.ClientSession, provider: Provider) -> list[str]:
    """A provider's model ids; ApiError (its message safe to log) when it cannot say."""
    raw = await ask(session, provider, "GET", provider.models_url, MAX_BODY)
    try:
        listed = _decoder.decode(raw).data
    except msgspec.DecodeError:
        raise ApiError(502, f"provider '{provider.name}' sent a malformed model list") from None
    return list(dict.fromkeys(m.id for m in listed if m.id))[:MAX_MODELS]


async def _keep_fresh(session: aiohttp.ClientSession, router: Router, provider: Provider) -> None:
    failing = False
    while True:
        try:
            router.discovered[provider.name] = await models_of(session, provider)
            failing = False
        except ApiError as exc:
            if not failing:  # once per outage, not once per refresh
                log.warning("%s; its models are not listed in /v1/models", exc.message)
            failing = True
        await asyncio.sleep(provider.config.models_refresh_s)


def listed_by_themselves(router: Router) -> list[Provider]:
    """Providers whose models come from their own list: none in config.toml, and a key of
    llmgate's own to ask with (a passthrough provider's key is each caller's)."""
    return [
        p
        for p in router.providers.values()
        if not p.config.models and not p.unset_env and not p.passthrough
    ]


def keep_fresh(session: aiohttp.ClientSession, router: Router) -> list[asyncio.Task]:
    """One background task per provider to list; the caller cancels them (`stop`)."""
    return [
        asyncio.create_task(_keep_fresh(session, router, p)) for p in listed_by_themselves(router)
    ]


async def stop(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
