"""What taking llmgate's own phrases out of a history costs (agora.own_phrases_out): a
40-message call history with a waiting phrase, a filler and the apology configured, half
the assistant messages opening with one of them. The budget is 50 us a turn.

    .venv/bin/python scripts/bench_history.py
"""

from __future__ import annotations

import copy
import json
import timeit

from llmgate.agora import own_phrases_out

PHRASES = ("Sorry, I lost my connection. Could you say that again?",
           "Let me check that for you.", "One moment, let me check.")


def history() -> list[dict]:
    messages = [{"role": "system", "content": "You are the Lumen store's voice assistant. " * 8}]
    for i in range(20):
        said = "We open at nine and close at six on weekdays, and at four on Saturdays."
        if i % 2:
            said = f"{PHRASES[i % 3]} {said}"
        messages += [{"role": "user", "content": f"What about the store on day {i}?"},
                     {"role": "assistant", "content": said}]
    return messages[:40]


def main() -> None:
    base = history()
    copies = [copy.deepcopy(base) for _ in range(20_000)]
    it = iter(copies)
    n = 20_000
    seconds = timeit.timeit(lambda: own_phrases_out(next(it), PHRASES), number=n)
    print(json.dumps({"messages": len(base), "us_per_turn": round(seconds / n * 1e6, 2),
                      "budget_us": 50}))


if __name__ == "__main__":
    main()
