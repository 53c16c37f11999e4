"""Run an entry point with every decode step slowed: `python tests/slow_launch.py MS MODULE [ARGS...]` runs
`python -m MODULE ARGS...` (glm, glm.cli, glm.web, glm.serve) after making the scheduler sleep MS milliseconds
before each decode step (and tokenizing a text that holds SLOW_ENCODE slow).

The tiny test model answers in a blink; a test that presses Ctrl+C or Stop, or drops a stream, in the middle of a
reply needs the reply to last a while. The replies themselves are unchanged: only their pace. This lives in the
tests, not in the product, which has no option for it.
"""

from __future__ import annotations

import runpy
import sys
import time


def slow_down(ms: float) -> None:
    """Make every Scheduler sleep `ms` milliseconds before each decode step (in its worker thread)."""
    from glm.generation.scheduler import Scheduler

    step = Scheduler._decode_step

    def slow_step(self):
        time.sleep(ms / 1000)
        step(self)

    Scheduler._decode_step = slow_step


SLOW_ENCODE = "<slow-encode>"  # a text holding this takes SLOW_ENCODE_S seconds to tokenize
SLOW_ENCODE_S = 2.0


def slow_encode() -> None:
    """Make Tokenizer.encode sleep SLOW_ENCODE_S for a text holding SLOW_ENCODE: a huge prompt, without sending one
    (a test can check what else the server does meanwhile)."""
    from glm.tokenizer import Tokenizer

    encode = Tokenizer.encode

    def slow(self, text, *args, **kw):
        if isinstance(text, str) and SLOW_ENCODE in text:
            time.sleep(SLOW_ENCODE_S)
        return encode(self, text, *args, **kw)

    Tokenizer.encode = slow


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python tests/slow_launch.py MS MODULE [ARGS...]")
    ms, module, args = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    slow_down(ms)
    slow_encode()
    sys.argv = [module, *args]
    # As `python -m MODULE`: its `if __name__ == "__main__"` block runs, and its sys.exit ends this process. Not
    # alter_sys=True: its context managers would run Python code while that SystemExit leaves, where a Ctrl+C
    # that `python -m` would not see becomes a traceback of this launcher's own.
    runpy.run_module(module, run_name="__main__")


if __name__ == "__main__":
    main()
