"""Typed configs: conversion by field type, unknown keys named with the valid ones."""

import pytest

from safer_jax.config import ConfigError, MeshConfig, ModelConfig, from_dict


def test_from_dict_converts_by_type():
    m = from_dict(ModelConfig, {"path": "x", "scan_layers": "false", "param_dtype": "none"})
    assert m.scan_layers is False and m.param_dtype is None
    assert from_dict(MeshConfig, {"data": "2", "fsdp": "-1"}).data == 2


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key mesh.datta; valid keys: mesh.data, mesh.fsdp"):
        from_dict(MeshConfig, {"datta": 2}, prefix="mesh.")


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"data: expected an int, got 'two'"):
        from_dict(MeshConfig, {"data": "two"})
