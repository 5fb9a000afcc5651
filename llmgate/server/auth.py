"""Bearer keys: checked in constant time against every configured key."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from llmgate.errors import ApiError


class KeyCheck:
    def __init__(self, keys: list[str]) -> None:
        # Digests make every comparison the same length, so timing says nothing of a key.
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    @property
    def open(self) -> bool:
        return not self._digests

    def __call__(self, request: web.Request) -> str | None:
        """Return the caller's bearer key (None if absent); raise 401 if it is not accepted."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            if self.open:
                return None
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        if self.open:
            return token
        digest = hashlib.sha256(token.encode()).digest()
        accepted = False
        for known in self._digests:
            accepted |= hmac.compare_digest(digest, known)
        if not accepted:
            raise ApiError(401, "invalid API key")
        return token
