"""A tensor-parallel rank that rank 0 started (`python -m glm.parallel.worker`, see glm.parallel.world): it joins
rank 0 through the variables rank 0 set, makes its calls until it closes, and exits. Errors go to stderr in one
line, where rank 0 reads them."""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    # A Ctrl+C in the terminal reaches every process of its group: rank 0 decides what it means (glm-chat stops a
    # reply and goes on), and this rank goes when rank 0 tells it or is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from glm.errors import one_line
    from glm.parallel.mirror import serve
    from glm.parallel.world import World

    try:
        serve(World._started())
    except Exception as e:  # noqa: BLE001 - whatever stops this rank, rank 0 reports its last line
        print(f"rank {os.environ.get('RANK', '?')}: {type(e).__name__}: {one_line(str(e))}", file=sys.stderr,
              flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
