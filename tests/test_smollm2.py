"""The real model: SmolLM2-135M-Instruct from its GGUF file, against transformers."""

import logging

import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from safer_jax import sharding
from safer_jax.config import MeshConfig
from safer_jax.models import from_pretrained, save_pretrained
from safer_jax.sharding import make_mesh

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "How do I build a bomb?"]


def chat_ids(tok):
    rows = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in PROMPTS
    ]
    return [np.asarray(r)[None] for r in rows]


@pytest.fixture(scope="session")
def smollm2_jax(smollm2_torch):
    _, _, folder, gguf = smollm2_torch
    return from_pretrained(folder, gguf_file=gguf)


def test_gguf_logits_match_transformers(smollm2_torch, smollm2_jax):
    tm, tok, _, _ = smollm2_torch
    cfg = smollm2_jax.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings
    for ids in chat_ids(tok):
        with torch.no_grad():
            ref = tm(torch.tensor(ids)).logits.numpy()
        out = np.asarray(smollm2_jax(ids))
        err = np.abs(out - ref).max()
        print(f"SmolLM2 max |logit diff| = {err:.2e} over {ids.shape[1]} tokens")
        assert err < 1e-3
        assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_export_reloads_in_transformers(smollm2_torch, smollm2_jax, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tm, tok, _, _ = smollm2_torch
    save_pretrained(smollm2_jax, tmp_path, tokenizer=tok, max_shard_size="200MB")
    assert (tmp_path / "model.safetensors.index.json").exists()  # 540 MB in 200 MB shards
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) == 3
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = chat_ids(tok2)[0]
    assert ids.tolist() == chat_ids(tok)[0].tolist()
    with torch.no_grad():
        np.testing.assert_allclose(
            back(torch.tensor(ids)).logits.numpy(), tm(torch.tensor(ids)).logits.numpy(), atol=1e-4, rtol=1e-4
        )
    # our loader reads the sharded export too
    again = from_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(again(ids)), np.asarray(smollm2_jax(ids)), atol=1e-5, rtol=1e-5)


def test_smollm2_on_eight_devices(smollm2_dir, smollm2_jax, smollm2_torch, caplog):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharding._logged_fallbacks.clear()
    with caplog.at_level(logging.WARNING, logger="safer_jax.sharding"):
        model = from_pretrained(smollm2_dir, mesh=mesh)
    msgs = [r.message for r in caplog.records]
    assert sum("heads=9" in m for m in msgs) == 1, msgs  # logged once, not per parameter
    assert sum("kv_heads=3" in m for m in msgs) == 1, msgs
    wq = model.layers.wq[...]
    assert wq.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp", None, None)), 4)
    assert model.layers.w_gate[...].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp", "tensor")), 3)
    ids = chat_ids(smollm2_torch[1])[0]
    ids2 = np.concatenate([ids, ids], 0)
    np.testing.assert_allclose(np.asarray(model(ids2))[:1], np.asarray(smollm2_jax(ids)), atol=1e-4, rtol=1e-4)
