"""An answer cut into sentences while it streams, for speech synthesis one sentence at a time.

`SentenceSplitter.feed(delta)` returns the sentences the text so far completes;
`flush()` the rest at the end. A sentence ends at `.`, `!`, `?` or an ellipsis (with any
closing quotes or brackets) followed by space, or at a line break; not after "Dr.", "e.g.",
"U.S.", an initial ("J. K."), inside "3.5", after a list number ("1. "), or where the next
word starts in lower case. A clause that runs past `max_words` with no full stop is cut at
its last comma, semicolon, colon or dash (or after `max_words` words), so the first audio
never waits for a sixty-word sentence. `first_words`, when given, is that limit for the
answer's first piece alone, which also ends at its first comma, semicolon or colon ("Yes,
| we open at nine."): an engine that makes a piece's audio all at once starts sooner on a
short one, and a comma is where a speaker pauses anyway. A run of more than `max_chars`
characters with no space (a token of base64, a URL, a language written without spaces and
no full stop in sight) is cut after its last comma in the second half of that length, or
at the length, so nothing is held for ever. A cut is decided only once the text after it
is seen, so any split of the same answer gives the same sentences.
"""

from __future__ import annotations

import re

# Not the end of a sentence, whatever follows (compared in lower case).
ABBREVIATIONS = frozenset(
    (
        "mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "mt.", "vs.", "approx.",
        "dept.", "u.s.", "u.k.", "u.n.", "e.u.", "a.m.", "p.m.",
    )
)
# Titles, days and months: abbreviations only when capitalised ("Gen. Lee", "Jan. 5");
# in lower case they are words ("in the sun.", "a wed. day" is rare, "they got wed." not).
_CAPITALISED = frozenset(
    (
        "gen.", "gov.", "sen.", "rep.", "capt.", "lt.", "sgt.", "col.", "ave.", "rd.",
        "blvd.", "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.", "sept.",
        "oct.", "nov.", "dec.", "mon.", "tue.", "wed.", "thu.", "fri.", "sat.", "sun.",
    )
)
_LOWER_AFTER_OK = frozenset(("e.g.", "i.e.", "cf.", "viz."))
_BEFORE_NUMBERS = frozenset(("no.", "nos.", "fig.", "p.", "pp.", "vol.", "ch."))  # "No. 5"
_MARKS = ".!?\u2026"  # a run of these (and closing quotes) ends a sentence
# Chinese and Japanese end sentences with their own marks, and no space follows them.
_CJK_END = re.compile("[\u3002\uff01\uff1f]+[\u300d\u300f\u201d\uff09]*")
MAX_CHARS = 400  # the longest run without a space spoken as one piece
# Where a run without spaces may be cut: after a comma, a semicolon, a colon (also CJK's).
_RUN_PAUSES = ",;:\u3001\uff0c\uff1b\uff1a"
_CLAUSE = re.compile("[,;:](?=\\s)|\\s[-\u2013\u2014]\\s")
_DOTTED = re.compile(r"^(?:[A-Za-z]\.){2,}$")
_INITIAL = re.compile(r"^[A-Z]\.$")
_LIST_NUMBER = re.compile(r"^\d{1,3}\.$")
_NEXT = re.compile(r"\S")
_OPENERS = "\"'\u201c\u2018(["
_CLOSERS = "\"'\u201d\u2019)]"


class SentenceSplitter:
    def __init__(
        self,
        max_words: int = 20,
        min_words: int = 4,
        first_words: int | None = None,
        max_chars: int = MAX_CHARS,
    ) -> None:
        if max_words < 1 or (first_words is not None and first_words < 1) or max_chars < 2:
            raise ValueError("max_words and first_words must be at least 1, max_chars 2")
        self.max_words = max_words
        self.min_words = min_words
        self.max_chars = max_chars
        # A word, or the first max_chars + 1 characters of a longer run: telling a run is
        # too long never reads all of it (a provider's megabytes without a space).
        self._word = re.compile(f"\\S{{1,{max_chars + 1}}}")
        self._limit = first_words or max_words  # words before a forced cut, for now
        self._first = first_words is not None  # the answer's first piece is still to come
        self._buf = ""

    def feed(self, text: str) -> list[str]:
        self._buf += text
        return self._cut(final=False)

    def flush(self) -> list[str]:
        out = self._cut(final=True)
        rest, self._buf = self._buf.strip(), ""
        return [*out, rest] if rest else out

    def _cut(self, final: bool) -> list[str]:
        # Each sentence is read from where the last one ended, and the buffer is cut once:
        # a delta of many sentences costs its length, not its length times its sentences.
        # A sentence starts at its first word (whatever way the text was split).
        buf, out = self._buf, []
        start = _start(buf, 0)
        while (at := self._next_cut(buf, start, final)) is not None:
            sentence, start = buf[start:at].strip(), _start(buf, at)
            if sentence:
                out.append(sentence)
                self._limit, self._first = self.max_words, False
        self._buf = buf[start:]
        return out

    def _next_cut(self, buf: str, start: int, final: bool) -> int | None:
        """Where the first sentence from `start` ends, if the text so far says."""
        pos = start
        for words, word in enumerate(self._word.finditer(buf, start), 1):
            newline = buf.find("\n", pos, word.start())
            if newline >= 0 and buf[start:newline].strip():
                return newline + 1  # a line break ends what came before it
            if words > self._limit:
                return self._clause_cut(buf, start, word.start())
            cjk = _CJK_END.search(buf, word.start(), word.end())
            if word.end() - word.start() > self.max_chars:  # a run too long to wait on
                return self._run_cut(buf, word.start(), cjk)
            if cjk is not None and (cjk.end() < len(buf) or final):
                return cjk.end()  # (a closing quote may still follow the mark at the very end)
            if cjk is not None:
                return None
            if self._first and word.group()[-1] in ",;:" and _NEXT.search(buf, word.end()):
                return word.end()  # the first piece: its first pause is soon enough
            end = self._sentence_end(buf, start, word, final)
            if end is None:
                return None  # what follows decides
            if end:
                return end
            pos = word.end()
        return None

    def _sentence_end(
        self, buf: str, start: int, word: re.Match[str], final: bool
    ) -> int | None:
        """word.end() if the word ends a sentence, 0 if not, None if the next word decides."""
        token = word.group()
        body = token.rstrip(_CLOSERS)
        marks = body[len(body.rstrip(_MARKS)) :]  # the run of marks that ends the word
        if not marks:
            return 0
        following = _NEXT.search(buf, word.end())
        if following is None:
            return word.end() if final else None
        nxt = following.group()
        if "!" in marks or "?" in marks:
            return word.end()
        if len(marks) > 1 or "\u2026" in marks:  # an ellipsis: "wait... what" goes on
            return 0 if nxt.islower() else word.end()
        bare = token.lstrip(_OPENERS).rstrip(_CLOSERS)  # one full stop from here on
        lowered = bare.lower()
        line_at = max(start, buf.rfind("\n", start, word.start()) + 1)
        if _LIST_NUMBER.match(bare) and not buf[line_at : word.start()].strip():
            return 0  # "1. Preheat the oven": a list number, not a sentence
        if lowered in ABBREVIATIONS or lowered in _LOWER_AFTER_OK or _INITIAL.match(bare):
            return 0
        if lowered in _CAPITALISED and bare[0].isupper():
            return 0
        if lowered in _BEFORE_NUMBERS and nxt.isdigit():
            return 0
        if _DOTTED.match(bare):  # U.S., a.m.: a sentence ends only before a capital
            return word.end() if nxt.isupper() else 0
        return 0 if nxt.islower() else word.end()

    def _run_cut(self, buf: str, at: int, cjk: re.Match[str] | None) -> int:
        """A run of more than max_chars without a space, from `at`: cut at its CJK full
        stop, else after its last pause in the second half of max_chars, else there."""
        end = at + self.max_chars
        if cjk is not None and cjk.end() <= end:
            return cjk.end()
        half = at + self.max_chars // 2
        pause = max(buf.rfind(mark, half, end) for mark in _RUN_PAUSES)
        return pause + 1 if pause >= 0 else end

    def _clause_cut(self, buf: str, start: int, limit: int) -> int:
        """A long clause: after its last comma (or dash) that leaves `min_words` words
        before it, else right before the word past the limit."""
        best = None
        least = min(self.min_words, self._limit // 2)
        words, counted = 0, start
        for mark in _CLAUSE.finditer(buf, start, limit):
            words += len(self._word.findall(buf, counted, mark.start()))
            if words >= least:
                best = mark.end()
            words += mark.group()[0].isspace()  # a dash is a word; a comma ends one
            counted = mark.end()
        return best if best is not None else limit


def _start(buf: str, at: int) -> int:
    """Where the text from `at` on begins, past any space (the end if none is there yet)."""
    found = _NEXT.search(buf, at)
    return len(buf) if found is None else found.start()
