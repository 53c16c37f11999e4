"""Paths and golden data of the reference fixtures, shared by the tests (imported by name, unlike conftest)."""

import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"


def golden(name: str):
    """(golden.json as dict, golden.safetensors tensors) of a fixture folder."""
    from safetensors.torch import load_file

    folder = FIXTURES / name
    return json.loads((folder / "golden.json").read_text()), load_file(str(folder / "golden.safetensors"))
