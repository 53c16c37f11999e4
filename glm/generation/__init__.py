"""Generation: one route from a prompt to tokens for every entry point (generate, chat, glm-chat, glm-web,
glm-serve), each module one concern and importing nothing above it:

- `inputs`: prompt layout, GLM's 2D positions, id checks, the left-padded batch of an uncached forward;
- `sampling`: `GenerationConfig` (the one validator of every setting) and the batched per-row sampler;
- `request`: `Request` and `Result`;
- `adapters`: the LoRA adapters and P-Tuning prefixes one model serves side by side, by name;
- `runner`: the KV caches of a pool of rows, prefill, the decode step, compilation;
- `scheduler`: the queue, rows, admission, cancellation, finish decisions, the worker thread.
"""

from glm.errors import GenerationError, QueueFull
from glm.generation.inputs import Batch, check_ids, prompt_layout, prompt_positions
from glm.generation.request import Request, Result, TokenLogprob
from glm.generation.sampling import CHAT_DEFAULTS, GenerationConfig
from glm.generation.scheduler import Scheduler

__all__ = ["CHAT_DEFAULTS", "Batch", "GenerationConfig", "GenerationError", "QueueFull", "Request", "Result",
           "Scheduler", "TokenLogprob", "check_ids", "prompt_layout", "prompt_positions"]
