"""Typed configs: conversion by field type, unknown keys named with the valid ones."""

import pytest

from safer_jax.config import ConfigError, MeshConfig, ModelConfig, from_dict


def test_from_dict_converts_by_type():
    m = from_dict(ModelConfig, {"path": "x", "scan_layers": "false", "param_dtype": "none"})
    assert m.scan_layers is False and m.param_dtype is None
    assert from_dict(MeshConfig, {"data": "2", "fsdp": "-1"}).data == 2


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key mesh.datta; valid keys: mesh.data, mesh.dcn, mesh.fsdp"):
        from_dict(MeshConfig, {"datta": 2}, prefix="mesh.")


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"data: expected an int, got 'two'"):
        from_dict(MeshConfig, {"data": "two"})


def test_dotted_overrides_are_typed_by_the_field(tmp_path):
    """A str field keeps the override's text verbatim (YAML would read `#1 rule` as a comment, None,
    and `no` as False); other fields still parse (ints, bools, lists), and `none` clears an optional."""
    from safer_jax.config import PrefOptConfig, SFTConfig, load_config

    cfg = load_config(
        SFTConfig,
        None,
        [
            "data.system_prompt=#1 rule",
            "model.path=no",
            "data.seq_len=512",
            "model.scan_layers=no",
            "data.tokenizer=off",
        ],
    )
    assert cfg.data.system_prompt == "#1 rule" and cfg.model.path == "no" and cfg.data.tokenizer == "off"
    assert cfg.data.seq_len == 512 and cfg.model.scan_layers is False
    assert load_config(SFTConfig, None, ["data.system_prompt=none"]).data.system_prompt is None
    assert load_config(PrefOptConfig, None, ["preference.ld_reference=false"]).preference.ld_reference is False
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  path: no\n")  # YAML's own bool for an unquoted no: named, not turned into "False"
    with pytest.raises(ConfigError, match=r"model.path: expected a string, got the bool False; quote it"):
        load_config(SFTConfig, str(f))


def test_negative_read_ahead_names_the_field():
    from safer_jax.config import SFTConfig, load_config

    with pytest.raises(ConfigError, match=r"data\.read_threads: must be 0 or more, got -1"):
        load_config(SFTConfig, None, ["data.read_threads=-1"])
    assert load_config(SFTConfig, None, ["data.read_buffer=64"]).data.read_buffer == 64
