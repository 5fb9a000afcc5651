"""A real headless Chromium for the playground's tests, driven by playwright's Python package.

Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it), never a browser
playwright downloads. Without it (or without playwright) the tests that need it skip on a
developer's machine, saying how to install it; in CI (LLMGATE_CI=1) they fail instead.

One browser serves a whole test module. pytest-asyncio gives each test an event loop of its
own, and playwright's objects belong to the loop that made them, so the browser lives on a
loop in a thread of its own: a test awaits the browser's coroutines through `Browser.run`
(or a `Tab`, which does it for each call), while its own loop keeps serving the gateway.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Coroutine
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
NO_CHROMIUM = (
    "Chromium is not installed, so the playground's browser tests are skipped "
    "(Debian: sudo apt-get install chromium)"
)
NO_PLAYWRIGHT = (
    "playwright's Python package is not installed, so the playground's browser tests are "
    "skipped (pip install -e '.[test]')"
)


def _missing(message: str) -> None:
    if os.environ.get("LLMGATE_CI"):
        pytest.fail(message)
    pytest.skip(message)


def chromium() -> str:
    """The browser's path, or the test skips (fails in CI) saying how to install it."""
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        _missing(NO_CHROMIUM)
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _missing(NO_PLAYWRIGHT)
    return path  # type: ignore[return-value]


class Browser:
    """One Chromium, on a loop in a thread of its own."""

    def __init__(self) -> None:
        path = chromium()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        try:
            self.playwright, self.browser = self._wait(self._launch(path))
        except BaseException:
            self._stop_loop()
            raise

    async def _launch(self, path: str) -> tuple[Any, Any]:
        from playwright.async_api import async_playwright

        playwright = await async_playwright().start()
        try:
            browser = await playwright.chromium.launch(executable_path=path, args=ARGS)
        except BaseException:
            await playwright.stop()
            raise
        return playwright, browser

    def _wait(self, coro: Coroutine, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def run(self, coro: Coroutine) -> Any:
        """Await one of the browser's coroutines from a test's own loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def tab(self) -> Tab:
        """A page in a context of its own (its own sessionStorage), watched for dialogs,
        errors and the requests it sends."""
        return await self.run(self._tab())

    async def _tab(self) -> Tab:
        context = await self.browser.new_context()
        page = await context.new_page()
        tab = Tab(self, page)

        async def dialog(d: Any) -> None:
            tab.dialogs.append(d.message)
            await d.dismiss()

        page.on("dialog", dialog)
        page.on("pageerror", lambda e: tab.errors.append(str(e)))
        page.on("console", lambda m: tab.console.append(f"{m.type}: {m.text}"))
        page.on("request", lambda r: tab.requests.append(
            {"method": r.method, "url": r.url, "headers": r.headers, "body": r.post_data}
        ))
        return tab

    def close(self) -> None:
        try:
            self._wait(self.browser.close(), 20)
            self._wait(self.playwright.stop(), 20)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Tab:
    """A page whose every method is awaited from the test's loop: `await tab.click("#send")`."""

    def __init__(self, browser: Browser, page: Any) -> None:
        self.browser = browser
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []  # uncaught exceptions in the page
        self.console: list[str] = []  # CSP violations are reported here
        self.requests: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.page, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self.browser.run(method(*args, **kwargs))

        return call

    async def close(self) -> None:
        await self.browser.run(self.page.context.close())
