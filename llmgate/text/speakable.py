"""Text made speakable while it streams: markdown, emoji and URLs taken out of what a TTS reads.

`Speakable` is fed an answer's text delta by delta and returns what is safe to speak so far.
It holds back only what could still start a marker (a `*` at the end of a delta, the `h`
that may open `https://`, a `1` at the start of a line that may be `1. `), and releases it
as soon as the next character says it cannot: the spoken text is the same however the
answer was split, and no delta waits on more than the one after it. What is held back is
bounded (`HOLD` characters: a URL, a rule line or a code line that never ends is decided
on what has come once it is that long), so the work per delta is linear in the delta.

What goes: emphasis markers (`*`, `_`, `~~`), headings, list bullets and numbering, block
quotes, horizontal rules, inline code ticks (the code stays), code blocks (with their
content), links `[text](url)` (the text stays), images, table rules (cells are read
"a, b"), emoji and pictographs, and bare URLs (or their domain). Runs of whitespace become
one space, or one line end; none is spoken where nothing follows it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

Urls = Literal["drop", "domain", "keep"]

_URL_STARTS = ("https://", "http://", "www.")
_URL_TRAIL = ".,;:!?"
_NO_SPACE_BEFORE = frozenset(".,;:!?)")
_BULLETS = frozenset("-*+\u2022\u2023\u2043")
_RULES = frozenset("-*_")
_ESCAPABLE = frozenset("\\`*_{}[]()#+-.!|~>")
# At most this many characters wait for the next delta to decide them. A hostile provider's
# URL or rule line that never ends would otherwise be read again from its start with every
# delta (quadratic); real ones are far shorter.
HOLD = 4096
_URL_BODY = re.compile(r"[^ \t\n<>\"')\]]*")  # a URL ends at a space, <, >, a quote, ) or ]
# A run of characters that no rule here looks at: not whitespace, not a marker, not a
# possible pictograph (the blocks `is_pictograph` reads), and no h or w that could open a
# URL (one after a letter or digit cannot, nor an h before anything but t, a w before
# anything but w).
_WORD = re.compile(
    r"(?:(?<=[^\W_])[hHwW]|[hH](?=[^tT])|[wW](?=[^wW])"
    r"|[^\s*_~`\\!\[\]|()<>#hHwW\u2000-\u2bff\u3030\u303d\u3297\u3299"
    r"\ufe00-\ufe0f\U0001f000-\U0001faff\U000e0020-\U000e007f])+"
)


@dataclass(frozen=True)
class SpeechOptions:
    markdown: bool = True
    emoji: bool = True
    urls: Urls = "domain"


def is_pictograph(c: str) -> bool:
    """Emoji, pictographs and the invisible characters that build them."""
    o = ord(c)
    if o < 0x2000:
        return False
    return (
        0x1F000 <= o <= 0x1FAFF  # emoticons, pictographs, transport, flags, skin tones
        or 0x2600 <= o <= 0x27BF  # miscellaneous symbols, dingbats
        or 0x2B00 <= o <= 0x2BFF  # stars, arrows and shapes used as emoji
        or 0x25A0 <= o <= 0x25FF  # geometric shapes
        or 0x2300 <= o <= 0x23FF  # watch, hourglass, media controls
        or 0xFE00 <= o <= 0xFE0F  # variation selectors
        or 0xE0020 <= o <= 0xE007F  # tag characters (subdivision flags)
        or o in (0x200D, 0x20E3, 0x2022, 0x3030, 0x303D, 0x3297, 0x3299)
    )


class Speakable:
    """One answer's text, cleaned for speech as it streams: `feed()` each delta, then
    `finish()` once for whatever was held back."""

    __slots__ = (
        "_alt",
        "_brackets",
        "_buf",
        "_cell",
        "_code",
        "_fence",
        "_line_start",
        "_md",
        "_out",
        "_pending",
        "_plain",
        "_prev",
        "_started",
        "_target",
        "dropped",
        "options",
    )

    def __init__(self, options: SpeechOptions = SpeechOptions()) -> None:
        self.options = options
        self._md = options.markdown
        self._buf = ""
        self._out: list[str] = []
        self._line_start = True
        self._prev = "\n"  # the last character read
        self._fence: str | None = None  # inside a code block opened by this fence char
        self._code = False  # inside `inline code`
        self._target = 0  # parenthesis depth inside a link's (url)
        self._alt = False  # inside an image's [alt text]
        self._brackets = 0  # open [ of links
        self._cell = False  # a table cell ended: ", " before the next word
        self._pending = ""  # whitespace not yet spoken: " " or "\n"
        self._started = False
        self.dropped = 0  # characters read and not spoken
        self._plain = True  # runs of plain characters in one step (tests compare without)

    def feed(self, text: str) -> str:
        self._buf += text
        return self._scan(final=False)

    def finish(self) -> str:
        out = self._scan(final=True)
        self._pending, self._cell = "", False
        return out

    # --- output -------------------------------------------------------------------

    def _put(self, text: str) -> None:
        for c in text:
            if c in " \t\r\n\f\v":
                if self._started:
                    self._pending = "\n" if c == "\n" or self._pending == "\n" else " "
                if c == "\n":
                    self._cell = False
                continue
            if self.options.emoji and is_pictograph(c):
                self.dropped += 1
                continue
            if self._cell:
                self._out.append(", ")
                self._cell = False
            elif self._pending and c not in _NO_SPACE_BEFORE:
                self._out.append(self._pending)
            self._pending = ""
            self._out.append(c)
            self._started = True

    def _put_word(self, word: str) -> None:
        """`_put` for a run of characters none of which is whitespace or a pictograph."""
        if self._cell:
            self._out.append(", ")
            self._cell = False
        elif self._pending and word[0] not in _NO_SPACE_BEFORE:
            self._out.append(self._pending)
        self._pending = ""
        self._out.append(word)
        self._started = True

    def _drop(self, text: str) -> None:
        self.dropped += len(text)

    # --- scanning -----------------------------------------------------------------

    def _scan(self, final: bool) -> str:
        buf, i, n = self._buf, 0, len(self._buf)
        word = _WORD.match
        while i < n:
            if self._plain and not (self._line_start or self._target or self._alt):
                # The common case: a run of characters that mean nothing to markdown,
                # emoji or URLs goes out whole (a quarter of the per-character cost).
                found = word(buf, i)
                if found is not None:
                    j = found.end()
                    self._put_word(buf[i:j])
                    self._prev = buf[j - 1]
                    i = j
                    continue
            j = self._step(buf, i, final)
            if j is None:  # what comes next decides: wait for it, for so long
                if n - i <= HOLD:
                    break
                j = self._step(buf, i, True)  # held too long: decided on what is here
            if j > i:
                self._prev = buf[j - 1]
            i = j
        self._buf = buf[i:]
        out, self._out = "".join(self._out), []
        return out

    def _step(self, buf: str, i: int, final: bool) -> int | None:
        if self._fence is not None:
            return self._in_fence(buf, i, final)
        if self._line_start and self._md:
            return self._at_line_start(buf, i, final)
        return self._inline(buf, i, final)

    def _in_fence(self, buf: str, i: int, final: bool) -> int | None:
        """Inside a code block: drop whole lines, up to and with the closing fence's.

        Nothing of a code block is spoken, so waiting for each line's end costs nothing,
        and only a whole line says whether it closes the block (``` and nothing else).
        """
        end = buf.find("\n", i)
        if end < 0 and not final:
            return None
        stop = len(buf) if end < 0 else end + 1
        line = buf[i:stop].strip()
        self._drop(buf[i:stop])
        if len(line) >= 3 and line.strip(self._fence or "") == "":
            self._fence = None
            self._line_start = True
            self._put("\n")
        return stop

    def _at_line_start(self, buf: str, i: int, final: bool) -> int | None:
        """Block markers: headings, bullets, numbering, quotes, rules, tables, fences."""
        n, c = len(buf), buf[i]
        if c in " \t":
            self._put(c)
            return i + 1
        more = not final  # whether the end of `buf` is not the end of the answer
        if c in _RULES or c == "|":
            # A horizontal rule (--- , * * *) or a table's rule line (|---|:--|): dropped
            # whole. Anything but those characters before the line ends says it is not one.
            allowed = "|-: \t" if c == "|" else c + " \t"
            j = _skip(buf, i, allowed)
            if j == n and more:
                return None
            rule = c == "|" or buf.count(c, i, j) >= 3
            if rule and (j == n or buf[j] == "\n"):
                self._drop(buf[i:j])
                return j
        if c in _BULLETS or c == ">":
            if i + 1 == n and more:
                return None
            after = buf[i + 1] if i + 1 < n else "\n"
            if c == ">" or after in " \t":
                self._drop(buf[i : i + 2] if after in " \t" else c)
                if c != ">":
                    self._line_start = False
                return i + (2 if after in " \t" else 1)
        elif c == "#":
            j = _skip(buf, i, "#")
            if j == n and more:
                return None
            if j - i <= 6 and (j == n or buf[j] in " \t"):
                self._drop(buf[i : j + 1])
                self._line_start = False
                return min(j + 1, n)
        elif c.isdigit():
            j = _skip(buf, i, "0123456789")
            if j + 1 >= n and more:
                return None
            # "1. " opens a list item; "1990. A good year." does not.
            if j - i <= 3 and j < n and buf[j] in ".)" and (j + 1 == n or buf[j + 1] in " \t"):
                self._drop(buf[i : j + 2])
                self._line_start = False
                return min(j + 2, n)
        elif c in "`~":
            j = _skip(buf, i, c)
            if j - i >= 3:
                end = buf.find("\n", j)
                if end < 0 and more:
                    return None  # the info string (```python) goes with the fence
                end = n if end < 0 else end + 1
                self._drop(buf[i:end])
                self._fence = c
                self._line_start = True
                return end
            if j == n and more:
                return None
        elif c == "|":
            self._drop(c)  # a table row's leading pipe: no ", " before its first cell
            self._line_start = False
            return i + 1
        self._line_start = False
        return i

    def _inline(self, buf: str, i: int, final: bool) -> int | None:
        c = buf[i]
        more = not final
        if c == "\n":
            # Inline code and a link's target end with their line, whatever was left open.
            self._line_start, self._code, self._target = True, False, 0
            self._put(c)
            return i + 1
        if self._target:  # a link's (url "title"): not spoken
            if c == "(":
                self._target += 1
            elif c == ")":
                self._target -= 1
            self._drop(c)
            return i + 1
        if self._alt:  # an image's alt text: not spoken
            if c != "]":
                self._drop(c)
                return i + 1
            self._alt = False
            self._brackets += 1  # so that a "(" after it opens the image's url
            c = "]"
        if self._md:
            j = self._markdown(buf, i, c, more)
            if j != i:
                return j
        if c in "hHwW" and not self._prev.isalnum():
            return self._maybe_url(buf, i, more)
        self._put(c)
        return i + 1

    def _markdown(self, buf: str, i: int, c: str, more: bool) -> int | None:
        """Inline markers: what they consume, or `i` if `c` is none (None: wait)."""
        n = len(buf)
        nxt = buf[i + 1] if i + 1 < n else ("" if more else "\n")
        if self._code:
            if c == "`":
                self._code = False
                self._drop(c)
                return i + 1
            self._put(c)
            return i + 1
        if c in "*_~\\!]" and not nxt:
            return None
        if c == "\\":
            if nxt in _ESCAPABLE:
                self._drop(c)
                self._put(nxt)
                return i + 2
            return i
        if c == "`":
            self._code = True
            self._drop(c)
            return i + 1
        if c in "*_~":
            j = _skip(buf, i, c)
            if j == n and more:
                return None
            after = buf[j] if j < n else "\n"
            before = self._prev
            if c == "~" and j - i < 2:
                return i  # a single ~ is "about"
            if c == "*" and (
                (j - i == 1 and before in " \t" and after in " \t")
                or (before.isdigit() and after.isdigit())
            ):
                self._put(buf[i:j])  # 2 * 3, 2*3, 2**3: not emphasis
                return j
            if c == "_" and before.isalnum() and after.isalnum():
                return i  # snake_case
            self._drop(buf[i:j])
            return j
        if c == "!" and nxt == "[":
            self._alt = True
            self._drop("![")
            return i + 2
        if c == "[":
            self._brackets += 1
            self._drop(c)
            return i + 1
        if c == "]":
            if self._brackets:
                self._brackets -= 1
                if nxt == "(":
                    self._target = 1
                    self._drop("](")
                    return i + 2
            self._drop(c)
            return i + 1
        if c == "|":
            self._cell = True
            self._drop(c)
            return i + 1
        return i

    def _maybe_url(self, buf: str, i: int, more: bool) -> int | None:
        """A bare URL: dropped, read as its domain, or kept (`urls`)."""
        rest = buf[i : i + 8].lower()
        start = next((s for s in _URL_STARTS if rest.startswith(s)), None)
        if start is None:
            if more and any(s.startswith(rest) for s in _URL_STARTS) and i + len(rest) == len(buf):
                return None  # "htt" may yet be a URL
            self._put(buf[i])
            return i + 1
        j = _URL_BODY.match(buf, i + len(start)).end()  # type: ignore[union-attr]
        if j == len(buf) and more:
            return None
        while j > i + len(start) and buf[j - 1] in _URL_TRAIL:
            j -= 1  # "see https://x.org." ends a sentence, not the URL
        url = buf[i:j]
        urls = self.options.urls
        if urls == "keep":
            self._put(url)
        else:
            host = url[len(start) :] if start != "www." else url
            for sep in "/?#:":
                host = host.split(sep, 1)[0]
            host = host.removeprefix("www.").removeprefix("WWW.")
            if urls == "domain" and host:
                self._put(host)
            self._drop(url)
        return j


def _skip(buf: str, i: int, chars: str) -> int:
    """The index of the first character at or after `i` not in `chars`."""
    return _run(chars).match(buf, i).end()  # type: ignore[union-attr]


@functools.cache
def _run(chars: str) -> re.Pattern[str]:
    return re.compile(f"[{re.escape(chars)}]*")
