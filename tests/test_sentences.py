"""Sentences for speech, cut while the answer streams; the same however it is split."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgate.tts.sentences import MAX_CHARS, SentenceSplitter
from tests.conftest import split_at


def sentences(text: str, **options) -> list[str]:
    splitter = SentenceSplitter(**options)
    return splitter.feed(text) + splitter.flush()


def sentences_in_pieces(pieces: list[str], **options) -> list[str]:
    splitter = SentenceSplitter(**options)
    return [s for p in pieces for s in splitter.feed(p)] + splitter.flush()


TABLE = [
    ("Hello there. How are you? I am fine!", ["Hello there.", "How are you?", "I am fine!"]),
    ("Dr. Smith arrived at 3.5 p.m. today. He left.",
     ["Dr. Smith arrived at 3.5 p.m. today.", "He left."]),
    ("We use tools, e.g. hammers and saws. They work.",
     ["We use tools, e.g. hammers and saws.", "They work."]),
    ("I moved to the U.S. last year. The U.S. Army is big.",
     ["I moved to the U.S. last year.", "The U.S. Army is big."]),
    ("Wait... what? That's odd\u2026 Really odd.",
     ["Wait... what?", "That's odd\u2026", "Really odd."]),
    ("Steps:\n1. Preheat the oven.\n2. Mix the flour.\n10. Bake",
     ["Steps:", "1. Preheat the oven.", "2. Mix the flour.", "10. Bake"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("She said \u201cno.\u201d We agreed.", ["She said \u201cno.\u201d", "We agreed."]),
    ("J. K. Rowling wrote it. Read it.", ["J. K. Rowling wrote it.", "Read it."]),
    ("It costs 5. Then more.", ["It costs 5.", "Then more."]),
    ("See fig. 3 and No. 5 here. Said no. Fine.",
     ["See fig. 3 and No. 5 here.", "Said no.", "Fine."]),
    ("Call Mr. Brown or Mrs. Green etc. for help.",
     ["Call Mr. Brown or Mrs. Green etc. for help."]),
    ("A unknown abbrev. continues in lower case.", ["A unknown abbrev. continues in lower case."]),
    ("No full stop at the end", ["No full stop at the end"]),
    ("  \n\n  ", []),
    ("Line one\nLine two\n\nLine three", ["Line one", "Line two", "Line three"]),
    ("(See above.) Next one.", ["(See above.)", "Next one."]),
    ("The price is $3.50. Want it?", ["The price is $3.50.", "Want it?"]),
    ("Meet at 10:30 a.m. tomorrow. Bring snacks.",
     ["Meet at 10:30 a.m. tomorrow.", "Bring snacks."]),
    ("Visit https://x.com/docs. It has more.", ["Visit https://x.com/docs.", "It has more."]),
    ("We sat in the sun. It was warm.", ["We sat in the sun.", "It was warm."]),
    ("Buy pears, etc. Then go home.", ["Buy pears, etc.", "Then go home."]),
    ("Gen. Lee left on Jan. 5 this year.", ["Gen. Lee left on Jan. 5 this year."]),
    ("\u4f60\u597d\u3002\u6211\u5f88\u597d\uff01\u4f60\u5462\uff1f",
     ["\u4f60\u597d\u3002", "\u6211\u5f88\u597d\uff01", "\u4f60\u5462\uff1f"]),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_sentences(text, expected):
    assert sentences(text) == expected


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_one_character_at_a_time(text, expected):
    assert sentences_in_pieces(list(text)) == expected


def test_a_long_clause_is_cut_at_its_last_comma_within_the_limit():
    text = ("This is a very long sentence without any full stop that keeps going on and on, and "
            "it really should be cut somewhere so that audio can start early")
    first, second = sentences(text, max_words=20)
    assert first.endswith("on and on,") and second.startswith("and it really")


def test_a_long_clause_without_a_comma_is_cut_after_max_words():
    words = [f"w{i}" for i in range(50)]
    parts = sentences(" ".join(words), max_words=10)
    assert [len(p.split()) for p in parts] == [10] * 5


def test_the_first_sentence_goes_out_as_soon_as_the_next_word_begins():
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there.") == []  # "Dr." or "there."? the next word says
    assert splitter.feed(" N") == ["Hello there."]
    assert splitter.feed("ext one") == []
    assert splitter.flush() == ["Next one"]


WORDS = st.sampled_from(
    ["Hello", "there.", "Dr.", "U.S.", "e.g.", "3.5", "5.", "1.", "...", "\u2026", "wait",
     "What?", "Yes!", '"Stop."', "J.", "and,", "-", "\n", "\n\n", "lower", "Upper", "etc.",
     "$3.50.", "Jan.", "sun.", "\u4f60\u597d\u3002", "\u3002\u300d"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDS, max_size=40), st.data())
def test_any_split_gives_the_same_sentences(words, data):
    text = " ".join(words)
    pieces = split_at(text, data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    assert sentences_in_pieces(pieces, max_words=8) == sentences(text, max_words=8)
    assert " ".join(sentences(text, max_words=8)).split() == text.split()  # nothing lost
    short = {"max_words": 8, "first_words": 3}
    assert sentences_in_pieces(pieces, **short) == sentences(text, **short)


def test_the_first_piece_alone_may_be_cut_shorter():
    text = "Our store on Main Street opens at nine in the morning. It closes at six in the evening."
    assert sentences(text, max_words=20, first_words=5) == [
        "Our store on Main Street",
        "opens at nine in the morning.",
        "It closes at six in the evening.",
    ]
    # at its first comma, where a speaker pauses anyway; later ones as any sentence
    text = "Well, it opens at nine, and it closes at six on every weekday of the year."
    assert sentences(text, max_words=20, first_words=6) == [
        "Well,",
        "it opens at nine, and it closes at six on every weekday of the year.",
    ]
    assert sentences("1,000 people came. Yes.", first_words=5) == ["1,000 people came.", "Yes."]


def test_max_words_must_be_positive():
    with pytest.raises(ValueError):
        SentenceSplitter(max_words=0)


def _cost(text: str) -> float:
    """Seconds to cut `text`, given in one delta (the best of three)."""
    best = float("inf")
    for _ in range(3):
        splitter = SentenceSplitter(first_words=5)
        started = time.perf_counter()
        splitter.feed(text)
        splitter.flush()
        best = min(best, time.perf_counter() - started)
    return best


def test_a_huge_delta_costs_time_linear_in_its_length():
    # Every sentence cut used to copy the rest of the buffer and search all of it again:
    # a provider's megabyte delta of sentences took minutes of the event loop.
    sentence = "Our store opens at nine, Dr. Smith said. "
    small, large = _cost(sentence * 1200), _cost(sentence * 4800)
    assert large < 8 * small, (small, large)  # four times the text: about four times the work


def test_a_run_without_spaces_is_cut_at_a_bounded_length():
    # A 50 KB token with no space or mark (base64, a hostile provider) was held for ever:
    # no word ever ended, so no sentence did.
    token = "x" * 50_000
    splitter = SentenceSplitter()
    out = [s for at in range(0, len(token), 1000) for s in splitter.feed(token[at : at + 1000])]
    assert out and all(len(s) == MAX_CHARS for s in out)
    assert len(token) - len("".join(out)) <= MAX_CHARS  # what is still held is short
    assert "".join(out + splitter.flush()) == token  # nothing lost
    assert sentences(token) == [*out, token[len("".join(out)) :]]


def test_a_long_run_is_cut_after_its_last_pause():
    clause = "\u4f60\u597d" * 20 + "\uff0c"  # Chinese, no space, a comma every 41 characters
    text = clause * 30 + "\u3002"
    parts = sentences(text, max_chars=100)
    assert parts[0] == clause * 2 and all(p.endswith("\uff0c") for p in parts[:-1])
    assert "".join(parts) == text
    assert sentences("Read " + "a" * 250 + " now.", max_chars=100) == [
        "Read " + "a" * 100, "a" * 100, "a" * 50 + " now."
    ]
