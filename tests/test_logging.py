"""The turn's log line: text or JSON, its fields, and never an exception's text."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from llmgate.obs.logging import FLUSH_S, _BatchingHandler, _Formatter, setup
from llmgate.turn import SpeechNote, Turn


def record(turn: Turn, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    rec = logging.LogRecord("llmgate.turn", logging.INFO, __file__, 1, "turn", (), exc_info)
    rec.turn = turn.fields()
    return rec


def a_turn() -> Turn:
    turn = Turn("/chat/completions")
    turn.model, turn.provider, turn.status, turn.chunks = "gpt-4o-mini", "openai", 499, 3
    turn.usage = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {}}
    turn.metadata = {"channel": "ch 1", "turn_id": 4}
    turn.mark_first_token()
    return turn


def test_json_line_has_the_turn_fields():
    line = json.loads(_Formatter(json=True).format(record(a_turn())))
    assert line["status"] == 499 and line["model"] == "gpt-4o-mini"
    assert line["usage"] == {"prompt_tokens": 5, "completion_tokens": 2}
    assert line["metadata"] == {"channel": "ch 1", "turn_id": 4}
    assert line["request_id"].startswith("req_")
    assert isinstance(line["ttft_ms"], float) and isinstance(line["duration_ms"], float)


def test_text_line_is_one_line_of_key_values():
    line = _Formatter(json=False).format(record(a_turn()))
    assert "\n" not in line
    assert "status=499" in line and "provider=openai" in line
    assert 'metadata={"channel":"ch 1","turn_id":4}' in line


def test_exception_shows_its_class_only():
    secret = RuntimeError("Bearer sk-secret at /srv/llmgate/app.py line 3")
    for fmt in (True, False):
        line = _Formatter(json=fmt).format(record(a_turn(), secret))
        assert "RuntimeError" in line
        assert "sk-secret" not in line and "Traceback" not in line


@pytest.fixture
def restore_logging():
    loggers = [logging.getLogger(), logging.getLogger("llmgate")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def test_library_errors_go_through_the_same_formatter(capsys, restore_logging):
    setup("text", "info")
    try:
        raise ValueError("secret sk-abc in a library's exception")
    except ValueError:
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
    err = capsys.readouterr().err
    assert "Task exception was never retrieved" in err and "exc=ValueError" in err
    assert "sk-abc" not in err and "Traceback" not in err


async def test_info_lines_from_the_loop_are_written_in_one_batch(restore_logging):
    stream = io.StringIO()
    handler = _BatchingHandler(stream)
    handler.setFormatter(_Formatter(json=False))
    log = logging.getLogger("llmgate.test-batch")
    log.handlers[:], log.propagate = [handler], False
    log.setLevel(logging.INFO)
    log.info("one")
    log.info("two")
    assert stream.getvalue() == ""  # gathered, not yet written
    log.warning("now")  # a warning goes at once, with what waited before it
    assert [line.split()[-1] for line in stream.getvalue().splitlines()] == ["one", "two", "now"]
    log.info("three")
    await asyncio.sleep(FLUSH_S * 3)
    assert stream.getvalue().splitlines()[-1].endswith("three")


def test_off_the_loop_lines_are_written_at_once():
    stream = io.StringIO()
    handler = _BatchingHandler(stream)
    handler.setFormatter(_Formatter(json=True))
    handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None))
    assert json.loads(stream.getvalue())["msg"] == "hello"


def test_metadata_in_the_log_line_is_bounded():
    turn = Turn("/chat/completions")
    turn.metadata = {
        "document": "word " * 19_000,  # 95 KB of someone's text in a stray field
        "nested": {"list": list(range(500))},
        "channel": "ch1",
        "turn_id": 4,
        **{f"extra_{i}": "x" * 150 for i in range(40)},
    }
    line = _Formatter(json=True).format(record(turn))
    meta = json.loads(line)["metadata"]
    assert len(json.dumps(meta)) < 3000
    assert meta["document"].endswith("(95000 chars)") and len(meta["document"]) < 250
    assert isinstance(meta["nested"], str) and len(meta["nested"]) < 250
    assert meta["channel"] == "ch1" and meta["turn_id"] == 4
    assert meta["truncated_keys"] > 0


def test_usage_adds_up_across_rounds_and_the_last_finish_reason_stands():
    turn = Turn("/tools/chat/completions")
    turn.add_round(3, "tool_calls", {"prompt_tokens": 10, "completion_tokens": 5})
    turn.add_round(4, "stop", {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27})
    fields = turn.fields()
    assert fields["usage"] == {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 27}
    assert (fields["chunks"], fields["finish_reason"], fields["rounds"]) == (7, "stop", 2)


def test_stages_note_their_fields_under_their_name():
    turn = Turn("/chat/completions")
    turn.noted().speech = SpeechNote(dropped_chars=3)
    turn.noted().rag.waiting = True
    fields = turn.fields()
    assert fields["speech"] == {"dropped_chars": 3}
    assert fields["rag"] == {"waiting": True}  # what was not recorded is left out
    assert "tools" not in fields and "upstream" not in fields
