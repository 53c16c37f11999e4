"""Every error class of glm, in one leaf module that imports nothing of glm.

Each message is one printable line that says what to do: entry points print it as it is.
"""

from __future__ import annotations


def one_line(msg: str) -> str:
    """`msg` with line breaks and other unprintable characters escaped: error messages stay one printable line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in str(msg))


class ConfigError(ValueError):
    """A config.json that does not describe a ChatGLM-6B (GLM v1) model."""

    def __init__(self, msg: str):
        super().__init__(one_line(msg))


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or of another shape."""

    def __init__(self, msg: str):
        super().__init__(one_line(msg))


class ParallelError(RuntimeError):
    """Tensor parallelism that cannot start or go on: a rank that cannot start or died, ranks that disagree."""

    def __init__(self, msg: str):
        super().__init__(one_line(msg))


class GenerationError(ValueError):
    """A prompt or setting generation cannot work with."""


class QueueFull(GenerationError):
    """More requests are waiting than the scheduler accepts."""


class DataError(ValueError):
    """Training data the preprocessing cannot use; the message is one line that says what to do."""


class DistributedError(RuntimeError):
    """Ranks that cannot start or cannot agree (training on several processes); one line that says what to do.

    `shared`: every rank raises the same error (rank 0 reports it for all), not a failure of this rank alone.
    """

    def __init__(self, msg: str, shared: bool = False):
        super().__init__(one_line(msg))
        self.shared = shared


class TrainingError(RuntimeError):
    """A training run that cannot go on (a diverging loss, a checkpoint that does not fit the run): one line."""


class CLIError(Exception):
    """A problem an entry point reports as one line (`glm-chat: error: ...`), never as a traceback."""


__all__ = ["CLIError", "CheckpointError", "ConfigError", "DataError", "DistributedError", "GenerationError",
           "ParallelError", "QueueFull", "TrainingError", "one_line"]
