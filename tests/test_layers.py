"""The import layers of glm: every module's imports, deferred ones included, point down, never up or sideways.

entry points (cli, web, serve, the trainer's CLI) -> options -> chat / engine / the trainer -> generation ->
model / attention; loader -> quant -> kernels; tokenizer, config and errors are leaves.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "glm"

# A module may import modules of a lower rank, and modules of its own group (the longest matching prefix here).
RANKS = {
    "glm.errors": 0,
    "glm.config": 1,
    "glm.kernels": 2,
    "glm.attention": 2,
    "glm.tokenizer": 2,
    "glm.quant": 3,
    "glm.model": 3,
    "glm.lora": 3,
    "glm.loader": 4,
    "glm.parallel": 4,  # the package's docstring
    "glm.parallel.shard": 4,  # model, quant
    "glm.parallel.world": 4,  # torch.distributed only
    "glm.generation.inputs": 4,
    "glm.generation.sampling": 4,
    "glm.generation.adapters": 4,
    "glm.generation.request": 5,
    "glm.generation.grammar": 5,
    "glm.generation.runner": 5,
    "glm.generation.scheduler": 6,
    "glm.generation": 7,  # the package's __init__, which re-exports its modules
    "glm.parallel.mirror": 7,  # loader, generation.runner
    "glm.parallel.worker": 8,
    "glm.chat": 8,
    "glm.engine": 9,
    "glm.finetune": 9,  # the library part: data, loss, loop, distributed, part, full, lora, predict, metrics, outputs
    "glm.options": 10,
    "glm.openai_protocol": 10,  # glm-serve's wire format, apart from the app
    "glm.http_guard": 10,  # glm-serve's checks at the HTTP edge (Host, Origin, Content-Type, body, API key)
    "glm.cluster": 10.5,  # glm-serve's replicas on Ray Serve: uses options, used by serve (which hands it the app)
    "glm.finetune.cli": 11,
    "glm.finetune.launch": 11,  # the command line of several processes (torchrun's launcher), part of the cli
    "glm.cli": 11,
    "glm.web": 11,
    "glm.serve": 11,
    "glm.__main__": 12,
    "glm.finetune.__main__": 12,
}
WITHIN = ("glm.kernels", "glm.quant", "glm.loader", "glm.finetune")  # packages whose modules may import each other


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(module: str) -> str | None:
    best = None
    for g in RANKS:
        if (module == g or module.startswith(g + ".")) and (best is None or len(g) > len(best)):
            best = g
    return best


def _imports(path: Path) -> set[str]:
    """Every glm module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("glm.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "glm":  # `from glm import chat`: a submodule; other names are lazy re-exports
                found |= {f"glm.{a.name}" for a in node.names if (PKG / a.name).with_suffix(".py").exists()
                          or (PKG / a.name).is_dir()}
            elif node.module.startswith("glm."):
                found.add(node.module)
    return found


MODULES = sorted(p for p in PKG.rglob("*.py") if _name(p) != "glm")


def test_every_module_has_a_layer():
    assert [_name(p) for p in MODULES if _group(_name(p)) is None] == []


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_imports_point_down(path):
    me = _name(path)
    g = _group(me)
    upward = []
    for dep in sorted(_imports(path)):
        dg = _group(dep)
        if dg is None:
            continue
        same_package = any(me.startswith(w) and dep.startswith(w) for w in WITHIN) and RANKS[dg] <= RANKS[g]
        if dg == g or same_package or RANKS[dg] < RANKS[g]:
            continue
        upward.append(f"{me} -> {dep}")
    assert upward == []


def test_the_scheduler_never_needs_the_tokenizer():
    for p in (PKG / "generation").glob("*.py"):
        assert "glm.tokenizer" not in _imports(p), p.name


def test_no_module_over_450_lines():
    long = {_name(p): n for p in MODULES if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert long == {}
