"""Bearer keys: checked in constant time against every configured key; each has a name
(for the log line and the limits, never the key itself) and limits of its own."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from llmgate.errors import ApiError

OPEN = "open"  # the name of every caller of a server with no keys
# A caller without a good key is answered, then its connection closed: it cannot hold one
# open by asking again before the keep-alive timeout.
NO_KEY_CLOSE = {"Connection": "close"}


@dataclass(frozen=True, slots=True)
class Rule:
    max_concurrent: int | None  # None: no limit
    requests_per_minute: int | None


@dataclass(frozen=True, slots=True)
class Caller:
    key: str | None  # the bearer key as sent (a passthrough provider forwards it)
    name: str
    rule: Rule
    # None: any model; else the aliases and `provider/model` (or `provider/*`) it may use
    allowed: frozenset[str] | None = None

    def may_use(self, model_id: str, alias: bool) -> bool:
        """Whether this caller may ask for an alias, or for `provider/model`."""
        allowed = self.allowed
        if allowed is None or model_id in allowed:
            return True
        return not alias and f"{model_id.partition('/')[0]}/*" in allowed


@dataclass(frozen=True, slots=True)
class Key:
    key: str
    name: str
    rule: Rule
    allowed: frozenset[str] | None = None


class KeyCheck:
    def __init__(self, keys: list[Key], open_rule: Rule) -> None:
        # Digests make every comparison the same length, so timing says nothing of a key.
        self._known = tuple(
            (hashlib.sha256(k.key.encode()).digest(), Caller(k.key, k.name, k.rule, k.allowed))
            for k in keys
        )
        self._open_rule = open_rule

    @property
    def open(self) -> bool:
        return not self._known

    def __call__(self, request: web.Request) -> Caller:
        """The caller, by its bearer key; 401 if the key is missing or not accepted."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            if self.open:
                return Caller(None, OPEN, self._open_rule)
            raise ApiError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                headers=NO_KEY_CLOSE,
            )
        if self.open:
            return Caller(token, OPEN, self._open_rule)
        # A header that is not UTF-8 arrives with its bytes as surrogates: hashed as sent.
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for known, caller in self._known:  # every key compared, whichever matches
            if hmac.compare_digest(digest, known):
                found = caller
        if found is None:
            raise ApiError(401, "invalid API key", headers=NO_KEY_CLOSE)
        return found
