"""glm: a from-scratch PyTorch engine for ChatGLM-6B (GLM v1).

    import glm
    m = glm.load("THUDM/chatglm-6b", device="cuda", dtype="float16", quant=4)
    reply, history = m.chat("你好")

Importing glm is cheap: torch and the rest load on first use; triton and gradio only where they are needed.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": ("glm.engine", "load"),
    "ChatGLM": ("glm.engine", "ChatGLM"),
    "GLMConfig": ("glm.config", "GLMConfig"),
    "GLM": ("glm.model", "GLM"),
    "Tokenizer": ("glm.tokenizer", "Tokenizer"),
    "GenerationConfig": ("glm.generation", "GenerationConfig"),
    "GenerationError": ("glm.errors", "GenerationError"),
    "QueueFull": ("glm.errors", "QueueFull"),
    "CheckpointError": ("glm.errors", "CheckpointError"),
    "ConfigError": ("glm.errors", "ConfigError"),
    "build_prompt": ("glm.chat", "build_prompt"),
    "process_response": ("glm.chat", "process_response"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    if name == "save":
        return save
    raise AttributeError(f"module 'glm' has no attribute {name!r}")


def save(m, folder, merge_lora: bool = False):
    """Save a loaded model (quantized or not) as safetensors + config + tokenizer; `glm.load(folder)` reads it.
    A model with a LoRA adapter needs `merge_lora=True` (see `ChatGLM.save`)."""
    return m.save(folder, merge_lora=merge_lora)


__all__ = ["load", "save", "ChatGLM", "GLMConfig", "GLM", "Tokenizer", "GenerationConfig", "GenerationError",
           "CheckpointError", "ConfigError", "build_prompt", "process_response"]
