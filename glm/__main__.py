"""`python -m glm`: the terminal chat, the same as the `glm-chat` command."""

import sys

from glm.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m glm"))
