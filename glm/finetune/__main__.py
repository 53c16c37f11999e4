"""`python -m glm.finetune ARGS` and `torchrun -m glm.finetune ARGS`: the `glm-finetune` command."""

import sys

from glm.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
