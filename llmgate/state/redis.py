"""Admission, provider health and barge-in shared by every llmgate process through Redis.

    admission   one Lua script, one round trip, per turn of a key that has a limit: slots
                in flight (a sorted set of leases) and the key's GCRA time, checked and
                taken at once; a key without limits never asks Redis. Each process holds
                its own bound on streams in flight in all (its descriptors), as before.
    release     never waited on: carried by this process's next admission of that key, or
                sent with others in one pipeline within RELEASE_S
    leases      refreshed by each process for the slots it holds; a killed process's come
                back after `lease_s`
    barge-in    a turn with a channel and a turn_id is published (queued, never waited on):
                every process hears it and ends an older turn of that channel it runs
                (Channels.supersede)
    health      each provider failure is counted in a shared window; the process whose
                failure opens the circuit publishes it, and so do a close and a 429's
                cool-down; a half-open circuit's probe is one SET NX across all processes

Redis down or slower than `timeout_ms`: this process's own state serves at once (fail
open), one log line says so and one says when it is shared again; a task reconnects.
Keys carry a hash tag per caller key, channel or provider: each script touches one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from yarl import URL

from llmgate.bargein import Channels, SharedChannels
from llmgate.server.auth import Caller
from llmgate.server.limits import LocalLimits, limited
from llmgate.state import State

if TYPE_CHECKING:
    from llmgate.config import StateConfig
    from llmgate.upstream.targets import Health

log = logging.getLogger("llmgate.state")

RETRY_S = 1.0  # between reconnection attempts while Redis is down
RELEASE_S = 0.02  # a slot given back waits this long for an admission to carry it
FAILURES = (RedisError, OSError, TimeoutError, asyncio.TimeoutError)

# KEYS: the key's slots (zset), its GCRA time. ARGV: max in flight (0: none), requests a
# minute (0: none), the slot's id, its lease in ms, then slots this process gives back
# (their turns ended since its last call). -> {0} admitted, {1} too many in flight,
# {2, ms} over the rate (ms: when one more fits).
ADMIT = """
for i = 5, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local most, rate, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= most then return {1, 0} end
end
if rate > 0 then
  local step = 60000 / rate
  local full = tonumber(redis.call('GET', KEYS[2]) or now)
  if full < now then full = now end
  full = full + step
  if full - now > 60000 then return {2, math.ceil(full - 60000 - now)} end
  redis.call('SET', KEYS[2], tostring(full), 'PX', math.ceil(full - now) + 1000)
end
if most > 0 then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], lease + 1000)
end
return {0, 0}
"""

# KEYS: a key's slots. ARGV: the lease in ms, then the slot ids this process holds.
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease + 1000)
return 0
"""

# KEYS: the provider's failures (zset), its open mark. ARGV: window ms, failures that
# open it, cool-down ms, a unique member, the pub/sub channel, the message to publish.
FAILED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[3]))
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return 1
end
return 0
"""


# KEYS: a provider's probe claim. ARGV: this process. Given up only by its holder.
UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Message(msgspec.Struct, omit_defaults=True):
    kind: str  # "turn" (barge-in) or "health"
    key: str = ""  # a channel's key, or a provider's name
    n: int = 0  # the turn_id
    state: str = ""  # open, closed, cooling
    for_s: float = 0.0
    origin: str = ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Message).decode


class _Slot:
    __slots__ = ("caller", "id", "key")

    def __init__(self, caller: Caller, slot_id: str | None, key: str | None) -> None:
        self.caller = caller
        self.id = slot_id
        self.key = key


def where(url: str) -> str:
    """The URL as a log line may show it: no password, no user."""
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port or 6379}{parsed.path or ''}"


class RedisState(State):
    def __init__(self, settings: StateConfig, global_max: int) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        self.timeout_s = settings.timeout_ms / 1000
        self.lease_ms = int(settings.lease_s * 1000)
        self.origin = os.urandom(6).hex()  # this process, in what it publishes
        self.topic = f"{self.prefix}events"
        self.local = LocalLimits(global_max)
        self.local_channels = Channels()
        super().__init__(
            SharedLimits(self), SharedChannels(self.local_channels, self.announce), Board(self)
        )
        self._shared = False
        self._client: Any = None
        self._listener_client: Any = None
        self._scripts: dict[str, Any] = {}
        self._outbox: list[Callable[[Any], Any]] = []  # each adds its call to a pipeline
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count()
        self.held: dict[str, str] = {}  # slot id -> its key's slots (for the lease refresh)
        self.released: dict[str, list[str]] = {}  # a key's slots -> slot ids given back
        self._releasing: asyncio.TimerHandle | None = None
        self._reconnecting: asyncio.Task | None = None
        # The loops end on this, not on cancellation alone: redis-py may swallow a cancel
        # that lands inside one of its reads.
        self._closing = False

    @property
    def shared(self) -> bool:
        return self._shared

    # -- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        url = self.settings.redis_url
        self._client = aioredis.from_url(
            url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
            health_check_interval=0,
            # a pooled connection found dead is replaced once, within the same timeout
            retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError],
        )
        # pub/sub waits for messages as long as none come: no read timeout on its socket,
        # but a PING now and then, so a half-open connection is found and replaced
        self._listener_client = aioredis.from_url(
            url, socket_connect_timeout=max(self.timeout_s, 1.0), health_check_interval=10
        )
        for name, lua in (("admit", ADMIT), ("refresh", REFRESH), ("failed", FAILED),
                          ("unclaim", UNCLAIM)):
            self._scripts[name] = self._client.register_script(lua)
        if await self._ping():
            self._went_shared(first=True)
        else:
            log.warning("state: Redis at %s is unreachable; limits, circuits and barge-in "
                        "are this process's own until it is back", where(url))
            self._reconnect_soon()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._send_loop()),
            loop.create_task(self._listen_loop()),
            loop.create_task(self._refresh_loop()),
        ]

    async def aclose(self) -> None:
        self._closing = True
        if self._releasing is not None:
            self._releasing.cancel()
        self._send_released()
        self._wake.set()
        tasks = [*self._tasks, *([self._reconnecting] if self._reconnecting else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        await self._flush()  # releases still queued: given back now if Redis answers
        for client in (self._client, self._listener_client):
            if client is not None:
                with contextlib.suppress(*FAILURES):
                    await client.aclose()

    # -- calls ---------------------------------------------------------------------------

    async def call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """`make()`'s result within timeout_ms; on any failure Redis is down for now
        (and `Down` is raised for the caller to serve locally)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await make()
        except FAILURES as exc:
            self.went_local(exc)
            raise Down from None

    def script(self, name: str, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        return self._scripts[name](keys=keys, args=args)

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(max(self.timeout_s, 0.5)):
                await self._client.ping()
                for script in self._scripts.values():  # loaded now, not on a turn's path
                    await self._client.script_load(script.script)
            return True
        except FAILURES:
            return False

    def went_local(self, exc: BaseException) -> None:
        if self._shared:
            self._shared = False
            log.warning("state: Redis failed (%s); limits, circuits and barge-in are this "
                        "process's own until it is back", type(exc).__name__)
            _gauge(0)
        self._reconnect_soon()

    def _went_shared(self, first: bool = False) -> None:
        self._shared = True
        _gauge(1)
        self._send_released()
        if first:
            log.info("state: shared through Redis at %s", where(self.settings.redis_url))
        else:
            log.warning("state: Redis is back; limits, circuits and barge-in are shared again")

    def _reconnect_soon(self) -> None:
        if self._closing:
            return
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while not self._shared and not self._closing:
            await asyncio.sleep(RETRY_S)
            with contextlib.suppress(*FAILURES):  # pooled connections died with Redis
                await self._client.connection_pool.disconnect()
            if await self._ping():
                self._went_shared()

    # -- queued calls: releases, announcements, reports ----------------------------------

    def queue(self, add: Callable[[Any], Any]) -> None:
        self._outbox.append(add)
        self._wake.set()

    async def _send_loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Exception:  # never a dead sender under a growing outbox
                log.error("state: sending to Redis failed", exc_info=True)

    async def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        if not self._shared:
            return  # dropped: a slot's lease ends it; a missed announcement is a lost race
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                async with self._client.pipeline(transaction=False) as pipe:
                    for add in batch:
                        added = add(pipe)
                        if inspect.isawaitable(added):  # (a script, in a pipeline)
                            await added
                    # one command's error reply (READONLY after a failover, say) costs
                    # that command, not the batch
                    await pipe.execute(raise_on_error=False)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            self.went_local(exc)
        except RedisError as exc:
            log.warning("state: Redis refused a batch (%s)", type(exc).__name__)

    async def _refresh_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.lease_ms / 3000)
            if not self.held or not self._shared:
                continue
            by_key: dict[str, list[str]] = {}
            for slot, key in list(self.held.items()):
                by_key.setdefault(key, []).append(slot)
            for key, slots in by_key.items():
                self.queue(lambda pipe, key=key, slots=slots: self._scripts["refresh"](
                    keys=[key], args=[self.lease_ms, *slots], client=pipe
                ))

    # -- what others publish -------------------------------------------------------------

    async def _listen_loop(self) -> None:
        while not self._closing:
            try:
                async with self._listener_client.pubsub() as pubsub:
                    await pubsub.subscribe(self.topic)
                    while not self._closing:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None and message.get("type") == "message":
                            self._heard(message["data"])
            except FAILURES:
                pass  # (the call path notices Redis being down)
            except Exception:  # never a dead listener
                log.error("state: listening to Redis failed", exc_info=True)
            if not self._closing:
                await asyncio.sleep(RETRY_S)

    def _heard(self, data: bytes) -> None:
        try:
            message = _decode(data)
        except msgspec.DecodeError:
            return
        if message.kind == "turn":
            self.local_channels.supersede(message.key, message.n)
        elif message.kind == "health":
            self.board.heard(message)  # type: ignore[attr-defined]

    # -- barge-in ------------------------------------------------------------------------

    def announce(self, key: str, number: int) -> None:
        """Every process hears it; each ends only an older turn of that channel (a late or
        repeated turn_id, or a channel whose numbering began again, ends nothing newer)."""
        message = _encode(_Message("turn", key=key, n=number, origin=self.origin))
        self.queue(lambda pipe: pipe.publish(self.topic, message))

    def give_back(self, key: str, slot_id: str) -> None:
        """A slot's turn ended: the next admission of its key here takes it back in the
        same script; if none comes within RELEASE_S, a pipeline does."""
        self.released.setdefault(key, []).append(slot_id)
        if self._releasing is None:
            loop = asyncio.get_running_loop()
            self._releasing = loop.call_later(RELEASE_S, self._send_released)

    def give_back_all(self, key: str, slot_ids: list[str]) -> None:
        for slot_id in slot_ids:
            self.give_back(key, slot_id)

    def take_released(self, key: str) -> list[str]:
        return self.released.pop(key, [])

    def _send_released(self) -> None:
        self._releasing = None
        if not self._shared:
            return  # kept until Redis is back (a ZREM of a slot gone already is harmless)
        released, self.released = self.released, {}
        for key, slots in released.items():
            self.queue(lambda pipe, key=key, slots=slots: pipe.zrem(key, *slots))

    def next_slot(self) -> str:
        return f"{self.origin}:{next(self._ids)}"


class Down(Exception):
    """Redis did not answer in time: serve from this process's state."""


class SharedLimits:
    """Per-key limits in Redis, this process's bound on streams in flight in all here."""

    def __init__(self, state: RedisState) -> None:
        self.state = state

    @property
    def max_concurrent(self) -> int:
        return self.state.local.max_concurrent

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        self.state.local.max_concurrent = value

    async def admit(self, caller: Caller) -> _Slot:
        state, local, rule = self.state, self.state.local, caller.rule
        most, rate = rule.max_concurrent, rule.requests_per_minute
        if (most is None and rate is None) or not state.shared:
            local.check(caller)  # nothing to share, or Redis is down: this process's own
            local.take(caller)
            return _Slot(caller, None, None)
        local.check(caller, in_flight=False)
        local.take(caller)  # this process's own bound, held while Redis is asked
        name = caller.name
        slots_key = f"{state.prefix}{{key:{name}}}:slots"
        rate_key = f"{state.prefix}{{key:{name}}}:rate"
        slot_id = state.next_slot()
        released = state.take_released(slots_key)
        args = [most or 0, rate or 0, slot_id, state.lease_ms, *released]
        try:
            verdict, wait_ms = await state.call(
                lambda: state.script("admit", [slots_key, rate_key], args)
            )
        except BaseException as exc:
            # No answer (Redis slow or down, or the caller left meanwhile): the script may
            # have run all the same. Its slot, and the slots it was to give back, are given
            # back once Redis answers again: a lost reply never holds a slot for lease_s.
            state.give_back_all(slots_key, [slot_id, *released])
            local.give_back(caller)
            if not isinstance(exc, Down):
                raise
            local.check(caller)  # Redis is down: this process's own
            local.take(caller)
            return _Slot(caller, None, None)
        if verdict != 0:
            local.give_back(caller)
        if verdict == 1:
            raise limited(f"key '{name}' has {most} streams in flight, its most", 1)
        if verdict == 2:
            raise limited(f"key '{name}' is over its {rate} requests a minute", wait_ms / 1000)
        if most is None:
            return _Slot(caller, None, None)
        state.held[slot_id] = slots_key
        return _Slot(caller, slot_id, slots_key)

    async def release(self, slot: _Slot) -> None:
        state = self.state
        state.local.give_back(slot.caller)
        if slot.id is not None and slot.key is not None and state.held.pop(slot.id, None):
            state.give_back(slot.key, slot.id)


class Board:
    """Provider health told to, and heard from, the other processes."""

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self._health: dict[str, Health] = {}

    def watch(self, health: Health) -> None:
        self._health[health.name] = health

    def heard(self, message: _Message) -> None:
        health = self._health.get(message.key)
        if health is not None and message.origin != self.state.origin:
            health.remote(message.state, message.for_s)

    def _publish(self, provider: str, state: str, for_s: float) -> None:
        st = self.state
        message = _encode(_Message("health", key=provider, state=state, for_s=for_s,
                                   origin=st.origin))
        st.queue(lambda pipe: pipe.publish(st.topic, message))

    def failed(self, provider: str, status: int, retry_after_s: float | None) -> None:
        st = self.state
        if retry_after_s is not None:
            self._publish(provider, "cooling", retry_after_s)
            return
        health = self._health.get(provider)
        if health is None:
            return
        breaker = health.breaker
        tag = f"{st.prefix}{{health:{provider}}}"
        message = _encode(_Message("health", key=provider, state="open",
                                   for_s=breaker.cooldown_s, origin=""))
        args = [int(breaker.window_s * 1000), breaker.failures, int(breaker.cooldown_s * 1000),
                st.next_slot(), st.topic, message]
        st.queue(lambda pipe: st._scripts["failed"](
            keys=[f"{tag}:failures", f"{tag}:open"], args=args, client=pipe
        ))

    def succeeded(self, provider: str) -> None:
        st = self.state
        tag = f"{st.prefix}{{health:{provider}}}"
        st.queue(lambda pipe: pipe.delete(f"{tag}:open", f"{tag}:probe"))
        self._publish(provider, "closed", 0.0)

    def abandoned(self, provider: str) -> None:
        st = self.state
        key = f"{st.prefix}{{health:{provider}}}:probe"
        st.queue(lambda pipe: st._scripts["unclaim"](keys=[key], args=[st.origin], client=pipe))

    async def claim_probe(self, provider: str, for_s: float) -> bool:
        st = self.state
        if not st.shared:
            return True
        key = f"{st.prefix}{{health:{provider}}}:probe"
        try:
            return bool(await st.call(lambda: st._client.set(
                key, st.origin, nx=True, px=max(1, int(for_s * 1000))
            )))
        except Down:
            return True


def _gauge(value: int) -> None:
    from llmgate.obs import metrics

    metrics.state_shared(value)


async def probe(settings: StateConfig, timeout_s: float) -> str:
    """`check`'s row: PING and the scripts loaded, within `timeout_s`; what it found, or
    an exception whose text names no password."""
    client = aioredis.from_url(
        settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
            for lua in (ADMIT, REFRESH, FAILED, UNCLAIM):
                await client.script_load(lua)
            info = await client.info("server")
        version = info.get("redis_version")
        return f"{where(settings.redis_url)}: PING and scripts ok (Redis {version})"
    except FAILURES as exc:
        raise ConnectionError(f"{where(settings.redis_url)}: {type(exc).__name__}") from None
    finally:
        with contextlib.suppress(*FAILURES):
            await client.aclose()
