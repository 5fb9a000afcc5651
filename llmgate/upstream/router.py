"""Which provider serves a request: `provider/name` picks one, anything else the first."""

from __future__ import annotations

from aiohttp import web

from llmgate.errors import ApiError
from llmgate.upstream.provider import Provider


class Router:
    def __init__(self, providers: dict[str, Provider]) -> None:
        if not providers:
            raise ValueError("a router needs at least one provider")
        self.providers = providers
        self.default = next(iter(providers.values()))

    def resolve(self, model: str | None) -> tuple[Provider, str]:
        if model:
            prefix, slash, name = model.partition("/")
            provider = self.providers.get(prefix) if slash and name else None
            if provider is not None:
                return provider, name
            return self.default, model
        if self.default.config.default_model:
            return self.default, self.default.config.default_model
        raise ApiError(
            400,
            f"model is required: name one, or set default_model on provider '{self.default.name}'",
            param="$.model",
        )

    def models(self) -> list[tuple[str, str]]:
        """(model id, provider name) for every configured model."""
        out = []
        for provider in self.providers.values():
            names = list(provider.config.models)
            default = provider.config.default_model
            if default and default not in names:
                names.insert(0, default)
            out += [(f"{provider.name}/{name}", provider.name) for name in names]
        return out


ROUTER = web.AppKey("router", Router)
