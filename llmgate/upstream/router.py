"""Which targets serve a request: an alias's, `provider/name`'s, or the first provider's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmgate.config import AliasConfig
from llmgate.errors import ApiError
from llmgate.upstream.provider import Provider
from llmgate.upstream.targets import Health, Plan, Target

if TYPE_CHECKING:
    from llmgate.state import HealthBoard

MAX_PLANS = 1024


class Router:
    def __init__(
        self,
        providers: dict[str, Provider],
        aliases: dict[str, AliasConfig] | None = None,
        board: HealthBoard | None = None,
    ) -> None:
        if not providers:
            raise ValueError("a router needs at least one provider")
        self.providers = providers
        self.default = next(iter(providers.values()))
        self.health = {
            name: Health(name, p.config.breaker, board) for name, p in providers.items()
        }
        self.aliases = {
            name: Plan(
                name,
                tuple(self._target(t) for t in alias.targets),
                alias.hedge_after_ms / 1000 if alias.hedge_after_ms else None,
                alias=True,
            )
            for name, alias in (aliases or {}).items()
        }
        # Discovered from each provider's own /models (upstream.catalog), listed, not routed.
        self.discovered: dict[str, list[str]] = {}
        self._plans: dict[str, Plan] = {}  # a model's one-target plan, made once

    def resolve(self, model: str | None) -> Plan:
        if model:
            plan = self.aliases.get(model) or self._plans.get(model)
            if plan is not None:
                return plan
            plan = Plan(model, (self._target(model),))
            if len(self._plans) < MAX_PLANS:  # callers' own model names are unbounded
                self._plans[model] = plan
            return plan
        default = self.default.config.default_model
        if default:
            return Plan(default, (self._target(f"{self.default.name}/{default}"),))
        raise ApiError(
            400,
            f"model is required: name one, or set default_model on provider '{self.default.name}'",
            param="$.model",
        )

    def _target(self, model: str) -> Target:
        """`provider/name` when `provider` is configured, else `model` whole on the first."""
        prefix, slash, name = model.partition("/")
        provider = self.providers.get(prefix) if slash and name else None
        if provider is None:
            provider, name = self.default, model
        return Target(provider, name, self.health[provider.name])

    def models(self) -> list[tuple[str, str]]:
        """(model id, owner) for every alias, configured model and discovered model."""
        out = [(name, "llmgate") for name in self.aliases]
        for provider in self.providers.values():
            names = list(provider.config.models or self.discovered.get(provider.name, []))
            default = provider.config.default_model
            if default and default not in names:
                names.insert(0, default)
            out += [(f"{provider.name}/{name}", provider.name) for name in names]
        return out

