"""Command line: `python -m llmgate --config config.toml [--host H] [--port P] [--check]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from llmgate import config as configuration
from llmgate.obs import logging as obs_logging

# The server's modules (the app, the loop, the workers) are imported by the command that
# serves; `kb` and `check` import what they need themselves.

log = logging.getLogger("llmgate")

EXIT_CONFIG = configuration.EXIT_CONFIG
EXIT_LISTEN = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmgate",
        description="OpenAI-compatible streaming gateway for Agora's Conversational AI Engine. "
        "Point the agent's llm.url at http://HOST:PORT/chat/completions.",
        epilog="commands: 'python -m llmgate check [--config F]' probes every provider, tool, "
        "knowledge base and speech engine the config names; 'python -m llmgate kb --help' "
        "ingests, lists and searches knowledge bases.",
    )
    parser.add_argument(
        "--config", default="config.toml", help="TOML config (default: %(default)s)"
    )
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument(
        "--check", action="store_true", help="validate the config, print what it serves, and exit"
    )
    parser.add_argument(
        "--workers", type=int, nargs="?", const=0, metavar="N",
        help="N processes on one port (SO_REUSEPORT); no N: one per core (server.workers)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kb"]:
        from llmgate.kb import cli as kb_cli

        return kb_cli.main(argv[1:])
    if argv[:1] == ["check"]:
        from llmgate import check

        return check.main(argv[1:])
    # SIGHUP (systemctl reload) before the server is up must not kill it: ignored until
    # serving installs its own handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = parse_args(argv)
    loaded = configuration.load_or_say(args.config)
    if loaded is None:
        return EXIT_CONFIG
    server = loaded.config.server
    obs_logging.setup(loaded.config.log.format, loaded.config.log.level)
    for warning in loaded.warnings:
        log.warning(warning)
    host = args.host or server.host
    port = server.port if args.port is None else args.port
    refusal = configuration.open_refusal(server, host)
    if refusal is not None:
        print(f"llmgate: config error: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        providers = ", ".join(loaded.config.providers)
        routes = ", ".join(r.path for r in loaded.config.routes)
        print(f"config ok: providers {providers}; routes {routes}; listen {host}:{port}")
        return 0
    return _serve(args, argv, loaded, host, port)


def _serve(
    args: argparse.Namespace, argv: list[str], loaded: configuration.Loaded, host: str, port: int
) -> int:
    from llmgate.app import create_app
    from llmgate.server import serve
    from llmgate.server import workers as workers_mod
    from llmgate.server.limits import raise_open_files

    server = loaded.config.server
    workers = server.workers if args.workers is None else (args.workers or workers_mod.cores())
    many = workers > 1 and not args.worker
    try:
        sock = serve.listen(host, port, server.send_timeout_s, reuse_port=many or args.worker)
    except OSError as exc:
        print(f"llmgate: cannot listen on {host}:{port} ({exc.strerror})", file=sys.stderr)
        return EXIT_LISTEN
    if many:
        sock.close()  # the port is free: each worker binds its own socket to it
        _say_what_next(loaded, host, port)
        argv = workers_mod.worker_argv(argv)
        return workers_mod.Supervisor(argv, workers, args.config, host).run()
    if args.worker:
        workers_mod.follow_parent()
    else:
        _say_what_next(loaded, host, sock.getsockname()[1])
    raise_open_files()  # before the limits are sized from it
    app = create_app(loaded)
    on_hup = _reloader(app, args.config, loaded, host)
    return serve.run(app, sock, server.uvloop, server.drain_s, server.read_timeout_s, on_hup)


# What a reload cannot change in a running process (the socket, the loop, the app's limits).
_AT_RESTART = ("host", "port", "uvloop", "send_timeout_s", "read_timeout_s", "drain_s",
               "workers")


def _reloader(app, path: str, loaded: configuration.Loaded, host: str):
    """SIGHUP: config.toml read again and served from the next turn on; a file that does
    not load is refused with a log line naming the key, and the running config stays."""
    current = [loaded]

    from llmgate.app import reload
    from llmgate.obs import metrics

    async def on_hup() -> None:
        log.info("SIGHUP: reading %s again", path)
        try:
            new = configuration.load_to_serve(path, host)
        except configuration.ConfigError as exc:
            log.error("config not reloaded, the running one stays: %s", exc)
            metrics.reloaded(False)
            return
        old = current[0].config
        for key in _AT_RESTART:
            if getattr(old.server, key) != getattr(new.config.server, key):
                log.warning("server.%s: a change takes effect at the next restart", key)
        if new.config.otel != old.otel:
            log.warning("otel: a change takes effect at the next restart")
        for warning in new.warnings:
            log.warning(warning)
        try:
            await reload(app, new)
        except Exception as exc:  # the type only: a message can hold what it was given
            log.error("config not reloaded, the running one stays (%s)", type(exc).__name__)
            metrics.reloaded(False)
            return
        metrics.reloaded(True)
        if new.config.log != old.log:
            obs_logging.setup(new.config.log.format, new.config.log.level)
        current[0] = new
        routes = ", ".join(r.path for r in new.config.routes)
        log.info("config reloaded: providers %s; routes %s", ", ".join(new.config.providers),
                 routes)

    return on_hup


def _say_what_next(loaded: configuration.Loaded, host: str, port: int) -> None:
    """The start-up lines: what is missing, and where to point a client."""
    for name, variables in loaded.unset_env.items():
        names = ", ".join(variables)
        log.warning("provider '%s' needs %s: set it and restart to use it", name, names)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}" if ":" not in shown else f"http://[{shown}]:{port}"
    routes = loaded.config.routes
    log.info(
        "starting on %s (\"ready\" follows once it serves): an OpenAI client's base_url is "
        "%s/v1; Agora's llm.url is https://<your host>%s (behind TLS)",
        base,
        base,
        routes[0].path,
    )
    for route in routes[1:]:  # each route's own base_url: the SDK adds /chat/completions
        path = route.path.removeprefix("/v1")
        stages = ", ".join(_stages(route)) or "relay"
        if path.endswith("/chat/completions"):
            where = f"base_url {base}/v1{path.removesuffix('/chat/completions')}"
        else:
            where = "POST it directly (an SDK's base_url needs a path ending /chat/completions)"
        log.info("route %s (%s): %s", route.path, stages, where)


def _stages(route: configuration.RouteConfig) -> list[str]:
    return [
        name
        for name, on in (
            ("rag", route.rag), ("tools", route.tools), ("speech", route.speech),
            ("audio", route.audio),
        )
        if on
    ]
