"""Speech-safe text: what a TTS gets for what a model writes, however the text is split."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgate.text.speakable import HOLD, Speakable, SpeechOptions, is_pictograph
from tests.conftest import split_at


def spoken(text: str, **options) -> str:
    s = Speakable(SpeechOptions(**options))
    return s.feed(text) + s.finish()


def spoken_in_pieces(pieces: list[str], **options) -> str:
    s = Speakable(SpeechOptions(**options))
    return "".join(s.feed(p) for p in pieces) + s.finish()


TABLE = [
    # emphasis
    ("**Hello** there, *friend*!", "Hello there, friend!"),
    ("***both*** and __under__ and _it_", "both and under and it"),
    ("~~struck~~ text, ~5 minutes", "struck text, ~5 minutes"),
    ("2 * 3 = 6, 2*3, 2**3, snake_case, name_2", "2 * 3 = 6, 2*3, 2**3, snake_case, name_2"),
    (r"\*literal\* and \_this\_", "*literal* and _this_"),
    # headings, lists, quotes, rules
    ("# Title\n## Sub title\nText.", "Title\nSub title\nText."),
    ("#1 priority, C# and F#", "#1 priority, C# and F#"),
    ("- one\n- two\n* three\n+ four\n\u2022 five", "one\ntwo\nthree\nfour\nfive"),
    ("1. first\n2) second\n10. tenth", "first\nsecond\ntenth"),
    ("1990. A good year.", "1990. A good year."),
    ("3.5 percent. Dr. Smith of the U.S. said e.g. this.",
     "3.5 percent. Dr. Smith of the U.S. said e.g. this."),
    ("2024 was a year", "2024 was a year"),
    ("> quoted\n> > nested\n>tight", "quoted\nnested\ntight"),
    ("Above\n---\n* * *\n___\nBelow", "Above\nBelow"),
    ("-5 degrees and -- a dash", "-5 degrees and -- a dash"),
    # code
    ("Run `pip install x` now.", "Run pip install x now."),
    ("Code:\n```python\nprint('*not* read')\n```\nDone.", "Code:\nDone."),
    ("~~~\nfenced\n~~~\nAfter", "After"),
    ("  ```\n  indented fence\n  ```\nAfter", "After"),
    ("Code:\n```\nx = 1\n``` still code\n```\nOk", "Code:\nOk"),
    ("The ` key is odd.\n\n**Bold** next", "The key is odd.\nBold next"),
    # links and images
    ("See [the docs](https://example.com/a_(b)) now.", "See the docs now."),
    ("![a cat](cat.png) Cute. [1] and [x]", "Cute. 1 and x"),
    ("[text] (not a link)", "text (not a link)"),
    ('[link](http://x.com "title") here', "link here"),
    ("(see https://x.com/p)", "(see x.com)"),  # a link is read as its domain
    # tables
    ("| Name | Age |\n|---|:---:|\n| Bob | 42 |\n", "Name, Age\nBob, 42"),
    # emoji
    ("Great job \U0001f44d\U0001f3fd! \U0001f389\U0001f389", "Great job!"),
    ("\U0001f44b Hi \U0001f1eb\U0001f1f7 and \U0001f468\u200d\U0001f469\u200d\U0001f467", "Hi and"),
    ("Stars \u2b50 and \u2764\ufe0f love", "Stars and love"),
    # urls
    ("Visit https://www.example.com/path?q=1. Then go.", "Visit example.com. Then go."),
    ("at http://a.b/c, or www.x.org", "at a.b, or x.org"),
    # a dropped link left "See the guide at or for more": read as its domain by default
    ("See the guide at https://docs.example.com/a/b or https://x.io/s for more.",
     "See the guide at docs.example.com or x.io for more."),
    ("the hotel https and httpx", "the hotel https and httpx"),
    # whitespace
    ("   \n\n  Hello   world  \n\n\n  Bye  ", "Hello world\nBye"),
    ("Hello \U0001f30d , world", "Hello, world"),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_spoken_text(text, expected):
    assert spoken(text) == expected


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_one_character_at_a_time_says_the_same(text, expected):
    assert spoken_in_pieces(list(text)) == expected


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        ("drop", "Visit. Or at."),
        ("domain", "Visit example.com. Or at docs.python.org."),
        ("keep", "Visit https://www.example.com/path?q=1. Or at http://docs.python.org:80/3/."),
    ],
)
def test_urls_option(urls, expected):
    text = "Visit https://www.example.com/path?q=1. Or at http://docs.python.org:80/3/."
    assert spoken(text, urls=urls) == expected


def test_markdown_and_emoji_can_be_kept():
    assert spoken("**a** \U0001f44d", markdown=False) == "**a**"
    assert spoken("**a** \U0001f44d", emoji=False) == "a \U0001f44d"


@pytest.mark.parametrize(
    ("pieces", "first"),
    [
        (["Hello", " wor", "ld"], "Hello"),
        (["*", "*bold**"], ""),  # the lone * waits: it may be emphasis ...
        (["*", " item"], ""),
        (["h", "ello"], ""),  # ... an h may open https:// ...
        (["1", "0 apples"], ""),  # ... a line may start "10. "
    ],
)
def test_held_back_only_while_a_marker_may_start(pieces, first):
    s = Speakable()
    assert s.feed(pieces[0]) == first
    second = s.feed(pieces[1])
    assert second  # one delta later it is out
    assert second.strip()  # and never a delta of nothing but spaces


def test_no_delta_is_only_whitespace_where_markup_was_removed():
    s = Speakable()
    outs = [s.feed(p) for p in ["Hi", " **", "\n\n## ", "\U0001f44d ", "there"]]
    assert outs == ["Hi", "", "", "", "\nthere"]


def test_counts_what_it_left_unsaid():
    s = Speakable()
    s.feed("**ab** \U0001f44d")
    s.finish()
    assert s.dropped == 5


def test_pictographs_and_plain_symbols():
    assert all(is_pictograph(c) for c in "\U0001f600\u2600\u2b50\ufe0f\u200d")
    assert not any(is_pictograph(c) for c in "aZ9.,!?\u00e9\u00a9\u2122\u20ac\u2192")


MARKUP = st.sampled_from(
    ["*", "**", "_", "__", "~~", "`", "```", "#", "## ", "- ", "1. ", "> ", "|", "[", "](",
     ")", "![", "\\", "\n", " ", "  ", "https://", "x.org/a", "www.", "\U0001f44d", "\ufe0f",
     "---", "3.5", "Dr.", "word", "snake_case", "h", "ht", "```\n", "~~~", '"t"', ", ", ". "]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(MARKUP, max_size=30), st.data())
def test_any_split_gives_the_same_spoken_text(parts, data):
    text = "".join(parts)
    pieces = split_at(text, data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    for urls in ("drop", "domain"):
        assert spoken_in_pieces(pieces, urls=urls) == spoken(text, urls=urls)


def spoken_slowly(pieces: list[str], **options) -> str:
    """The reference: every character through the rules, no runs of plain text at once."""
    s = Speakable(SpeechOptions(**options))
    s._plain = False
    return "".join(s.feed(p) for p in pieces) + s.finish()


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.one_of(MARKUP, st.text(max_size=6)), max_size=30),
    st.lists(st.integers(0, 200), max_size=6),
    st.booleans(),
)
def test_runs_of_plain_text_say_what_each_character_would(parts, cuts, emoji):
    text = "".join(parts)
    pieces = split_at(text, cuts)
    assert spoken_in_pieces(pieces, emoji=emoji) == spoken_slowly(pieces, emoji=emoji)


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_the_table_without_runs_of_plain_text(text, expected):
    assert spoken_slowly([text]) == expected


def _cost(text: str, delta: int) -> float:
    """Seconds to clean `text` fed `delta` characters at a time (the best of three)."""
    best = float("inf")
    for _ in range(3):
        s = Speakable()
        started = time.perf_counter()
        for at in range(0, len(text), delta):
            s.feed(text[at : at + delta])
        s.finish()
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize(
    ("opening", "unit"),
    [
        ("see https://", "a"),  # a URL that never ends
        ("\n", "-"),  # a rule line that never ends
        ("\n|", "-|"),  # a table's rule line
        ("\n#", "#"),  # a heading's marks
        ("\n", "7"),  # a line's number
    ],
)
def test_what_is_held_back_for_the_next_delta_costs_linear_time(opening, unit):
    # Each of these waits for what comes next; a provider sending megabytes of one in
    # small deltas had the whole of it read again with every delta (quadratic).
    def text(n: int) -> str:
        return opening + unit * (n // len(unit))

    small, large = _cost(text(100_000), 1000), _cost(text(400_000), 1000)
    assert large < 8 * small, (small, large)  # four times the text: about four times the work


def test_what_is_held_back_is_bounded():
    s = Speakable()
    s.feed("see https://" + "a" * 100_000)
    assert len(s._buf) <= HOLD
