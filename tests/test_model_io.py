"""Loader and exporter edge cases: bad input names file and tensor; hub cache; shards; overwrite."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import make_tiny

from safer_jax.cli import main as cli_main
from safer_jax.models import CheckpointError, ModelConfigError, from_pretrained, save_pretrained


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny("llama3", d)
    return d


def copy_of(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    return d


def edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_config(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"m/config.json: missing"):
        from_pretrained(d)


def test_invalid_config_json(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    (d / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 2"):
        from_pretrained(d)


def test_unsupported_model_type(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    edit_config(d, model_type="gpt2")
    with pytest.raises(ModelConfigError, match=r"config.json: model_type='gpt2' is not supported"):
        from_pretrained(d)


def test_unsupported_rope_type(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ModelConfigError, match=r"config.json: rope_parameters.rope_type='yarn'"):
        from_pretrained(d)


def test_missing_tensor(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        from_pretrained(d)


def test_misshapen_tensor(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    t = load_file(d / "model.safetensors")
    t["model.layers.2.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(t, d / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.layers.2.self_attn.k_proj.weight' "
        r"has shape \(16, 64\), expected \(32, 64\)",
    ):
        from_pretrained(d)


def test_unexpected_tensor(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.experts.0.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"not used by a llama decoder \(first: 'model.layers.0.mlp.experts"):
        from_pretrained(d)


def test_no_weights_file(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors"):
        from_pretrained(d)


def test_unsupported_features_refused(tiny_dir, tmp_path):
    d = copy_of(tiny_dir, tmp_path)
    edit_config(d, mlp_bias=True)
    with pytest.raises(ModelConfigError, match="mlp_bias"):
        from_pretrained(d)


def test_sharded_export_roundtrip_and_overwrite(tiny_dir, tmp_path):
    model = from_pretrained(tiny_dir)
    out = tmp_path / "out"
    save_pretrained(model, out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).exists() for f in files)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").exists()
    ids = np.arange(3, 40)[None]
    np.testing.assert_allclose(np.asarray(from_pretrained(out)(ids)), np.asarray(model(ids)), atol=1e-6)
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(model, out)
    save_pretrained(model, out, overwrite=True)  # one file now: stale shards removed
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_bfloat16_export(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = from_pretrained(tiny_dir, dtype="bfloat16")
    save_pretrained(model, tmp_path / "bf16")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_only_process_zero_writes(tiny_dir, tmp_path, monkeypatch):
    import jax

    model = from_pretrained(tiny_dir)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    save_pretrained(model, tmp_path / "p1")
    assert not (tmp_path / "p1").exists()


def test_hub_id_from_offline_cache(tiny_dir, tmp_path, monkeypatch):
    """A hub id resolves through the HF cache with HF_HUB_OFFLINE=1 (no network)."""
    import huggingface_hub.constants as hc

    assert hc.HF_HUB_OFFLINE
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / commit
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = from_pretrained("tiny-org/tiny-llama")
    ids = np.arange(3, 20)[None]
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(from_pretrained(tiny_dir)(ids)), atol=1e-6)
    with pytest.raises(CheckpointError, match="not a local folder and the hub download failed"):
        from_pretrained("tiny-org/not-cached")


def test_cli_convert(tiny_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok_src = tmp_path / "src"
    shutil.copytree(tiny_dir, tok_src)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(160)} | {"[UNK]": 3}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]").save_pretrained(tok_src)
    assert cli_main(["convert", "--from", str(tok_src), "--to", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(tmp_path / "out").convert_tokens_to_ids("w7") == 7
    # a second convert into the same folder is refused with a message, not a traceback
    assert cli_main(["convert", "--from", str(tok_src), "--to", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["convert", "--from", str(tmp_path / "nothing"), "--to", str(tmp_path / "o2")]) == 2
    assert "no such folder" in capsys.readouterr().err
