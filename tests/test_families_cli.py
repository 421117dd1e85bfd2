"""The whole CLI on every chat family's template, every shipped config for one step on a tiny
model of its family, hub ids from a local HF cache, and preference truncation that keeps spans.

The CLI runs in-process (`safer_jax.cli.main`): one JAX start-up for all of it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from chat_families import FAMILIES

from safer_jax.cli import main
from safer_jax.data.tokenize import ChatTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SFT_TINY = ROOT / "configs" / "sft" / "tiny.yaml"
PREF_TINY = ROOT / "configs" / "prefopt" / "tiny.yaml"
QUIET = ["train.tensorboard=false", "train.checkpoint_every=1000", "train.log_every=1", "train.export_final=false"]
# the Llama 3.2 template renders today's date unless told otherwise: fixed, so ids do not drift
KWARGS = {"llama3.2": ["data.chat_template_kwargs.date_string=26 Jul 2024"]}
SEQ = 256  # one sequence length for every run here: runs of one architecture and mesh share programs
PREFIX = ["<think>\n## Initial Assessment\nA request about locks.\n", "## Rule Verification\n"]


@pytest.fixture(scope="module")
def small_traces(traces, tmp_path_factory):
    """Ten bundled traces (harmful and benign) as a traces file: pairs, caches and evals stay small."""
    f = tmp_path_factory.mktemp("data") / "traces.jsonl"
    picked = [t for t in traces if t.label == "harmful"][:5] + [t for t in traces if t.label != "harmful"][:5]
    f.write_text("".join(json.dumps(t.to_json()) + "\n" for t in picked))
    return f


def _prompts(tmp: Path) -> Path:
    f = tmp / "prompts.jsonl"
    rows = [
        {"id": f"p{i}", "prompt": q}
        for i, q in enumerate(["What is a notary?", "How do plants grow?", "Tell me a joke.", "How do I pick a lock?"])
    ]
    rows[3]["assistant_prefix"] = PREFIX  # sampling continues the steps already written
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _family_of(cfg_path: Path) -> str:
    model = yaml.safe_load(cfg_path.read_text())["model"]["path"]
    if model.startswith("tiny"):
        return "tiny"
    if model == "smollm2":
        return "chatml"  # SmolLM2: a Llama with a ChatML template, like `chatml_model`
    for prefix, fam in (
        ("meta-llama/Llama-3.1", "llama3.1"),
        ("meta-llama/Llama-3.2", "llama3.2"),
        ("Qwen/Qwen2.5", "qwen2.5"),
        ("Qwen/Qwen3", "qwen3"),
        ("mistralai/", "mistral"),
    ):
        if model.startswith(prefix):
            return fam
    raise AssertionError(f"{cfg_path}: no tiny stand-in for model.path={model}")


def _mesh_for_8(mesh: dict) -> list[str]:
    """The config's fsdp and tensor sizes where they divide 8 devices, data taking the rest."""
    fsdp = mesh.get("fsdp", -1)
    tensor = mesh.get("tensor", 1)
    fsdp = fsdp if fsdp > 0 and 8 % (fsdp * tensor) == 0 else 8 // tensor
    return [f"mesh.data={8 // (fsdp * tensor)}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]


def _on_cpu(cfg_path: Path, model: str) -> list[str]:
    """Overrides that run a shipped config here: a tiny model, the mesh sized for 8 CPU devices,
    data.seq_len <= SEQ, data.batch_size <= 8, XLA attention."""
    raw = yaml.safe_load(cfg_path.read_text())
    return [
        f"model.path={model}",
        "model.attention=xla",
        f"data.seq_len={min(raw['data']['seq_len'], SEQ)}",
        f"data.batch_size={min(raw['data']['batch_size'], 8)}",
        *_mesh_for_8(raw.get("mesh", {})),
        *QUIET,
    ]


SHIPPED = sorted((ROOT / "configs" / "sft").glob("*.yaml")) + sorted((ROOT / "configs" / "prefopt").glob("*.yaml"))


def _cli_configs(fam: str) -> dict[str, Path]:
    """The shipped configs the whole-CLI test of `fam` runs its SFT and prefopt through (one each)."""
    out = {}
    for p in SHIPPED:
        if _family_of(p) == fam and (p.parent.name == "prefopt" or "8xh100" in p.stem):
            out[p.parent.name] = p
    return out


FAMILY_CONFIGS = {fam: _cli_configs(fam) for fam in FAMILIES}
IN_CLI_TEST = {p for configs in FAMILY_CONFIGS.values() for p in configs.values()}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_whole_cli_runs_on_every_template(name, family_models, small_traces, tmp_path, capsys):
    model = str(family_models[name])
    sft_cfg = FAMILY_CONFIGS[name].get("sft", SFT_TINY)
    pref_cfg = FAMILY_CONFIGS[name].get("prefopt", PREF_TINY)
    extra = [*KWARGS.get(name, []), f"data.train={small_traces}"]
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "sft",
                "--config",
                str(sft_cfg),
                f"run_dir={tmp_path / 'sft'}",
                "train.steps=2",
                *_on_cpu(sft_cfg, model),
                *extra,
            ]
        )
        == 0
    )
    saved = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())["data"]
    assert saved["trace_format"]["open_tag"] == "<think>"  # recorded in the run folder, with the template kwargs
    assert saved["chat_template_kwargs"] == ({"date_string": "26 Jul 2024"} if name in KWARGS else {})
    for span in ("step", "to_end"):
        pairs = tmp_path / f"pairs-{span}.jsonl"
        assert main(["make-pairs", "--traces", str(small_traces), "--out", str(pairs), "--span", span]) == 0
        args = [
            f"run_dir={tmp_path / ('pref-' + span)}",
            "train.steps=2",
            f"preference.cache_dir={cache}",
            *_on_cpu(pref_cfg, model),
            *extra,
            f"data.train={pairs}",
        ]
        if span == "step":
            assert main(["ref-logps", "--config", str(pref_cfg), *args]) == 0
        assert main(["prefopt", "--config", str(pref_cfg), *args]) == 0
    eot = FAMILIES[name].end_of_turn
    eot_id = json.loads((family_models[name] / "tokenizer.json").read_text())
    eot_id = next(t["id"] for t in eot_id["added_tokens"] if t["content"] == eot)
    steer = ["--max-new-tokens", "6", "--logit-bias", f"{eot_id}=1000"]  # the family's end token, always
    kwargs = {"date_string": "26 Jul 2024"} if name in KWARGS else {}
    out = tmp_path / "gen.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                model,
                "--prompts",
                str(_prompts(tmp_path)),
                "--out",
                str(out),
                *steer,
                "--chat-template-kwargs",
                json.dumps(kwargs),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["finish_reason"], r["completion_tokens"]) for r in rows] == [("stop", 1)] * 4
    ct = ChatTokenizer(load_tokenizer(model), template_kwargs=kwargs)
    assert rows[3]["text"] == "".join(PREFIX)  # prefix + continuation (here only the end token)
    assert rows[3]["prompt_tokens"] == len(ct.prompt_ids(ct.messages(rows[3]["prompt"]), PREFIX))
    assert (
        main(
            [
                "eval",
                "--model",
                model,
                "--sets",
                "bundled",
                "--limit",
                "4",
                "--out",
                str(tmp_path / "eval"),
                "--quiet",
                "--batch-size",
                "4",
                *steer,
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(res["rows"]) == 4 and {r["finish_reason"] for r in res["rows"]} == {"stop"}
    assert "finish reasons {'stop': 4}" in capsys.readouterr().out


# ---------------------------------------------------------------------------- every shipped config


@pytest.fixture(scope="module")
def chatml_model(traces, tmp_path_factory):
    """The session `tiny` model's family and ChatML template, one layer like the family models (so
    `configs/*/tiny.yaml` on it share the Llama 3.2 whole-CLI test's programs)."""
    from safer_jax.models.tiny import build_tiny_model

    texts = [t.prompt for t in traces] + [t.response for t in traces] + [str(t.steps) for t in traces]
    return build_tiny_model(tmp_path_factory.mktemp("chatml"), texts, num_layers=1)


@pytest.mark.parametrize(
    "cfg_path", [p for p in SHIPPED if p not in IN_CLI_TEST], ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_every_other_shipped_config_runs_one_step(cfg_path, family_models, chatml_model, small_traces, tmp_path):
    fam = _family_of(cfg_path)
    # tiny.yaml's `model.path: tiny` (a model built in the run folder) is the same family and template
    # as `chatml_model`; building it at run time is covered by the multi-process tests
    model = str(chatml_model) if fam in ("tiny", "chatml") else str(family_models[fam])
    command = cfg_path.parent.name
    over = [f"run_dir={tmp_path / 'run'}", "train.steps=1", *_on_cpu(cfg_path, model), f"data.train={small_traces}"]
    if command == "prefopt":
        over.append(f"preference.cache_dir={tmp_path / 'cache'}")
    assert main([command, "--config", str(cfg_path), *over]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1]


def test_shipped_configs_split_between_the_two_tests():
    assert sorted(f"{p.parent.name}/{p.stem}" for p in IN_CLI_TEST) == [
        "prefopt/llama3.1-8b-v5p8",
        "prefopt/qwen2.5-7b-8xh100",
        "sft/llama3.1-8b-8xh100",
        "sft/qwen2.5-7b-8xh100",
    ]
    assert len(SHIPPED) == 10  # the other six run in test_every_other_shipped_config_runs_one_step


# ---------------------------------------------------------------------------- hub ids


def _hub_snapshot(cache: Path, repo: str, folder: Path) -> None:
    """A local HF cache entry for `repo` holding `folder`'s files, as huggingface_hub writes one."""
    commit = "0" * 39 + "1"
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_from_the_local_cache_for_model_and_reference(
    family_models, small_traces, tmp_path, monkeypatch, capsys
):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    _hub_snapshot(hub, "safer-test/tiny-llama3.1", family_models["llama3.1"])
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at import time
    repo = "safer-test/tiny-llama3.1"
    args = [
        "--config",
        str(PREF_TINY),
        f"run_dir={tmp_path / 'run'}",
        f"model.path={repo}",
        f"preference.reference_path={repo}",
        "preference.reference=cache",
        f"preference.cache_dir={tmp_path / 'c'}",
        f"data.train={small_traces}",
        f"data.seq_len={SEQ}",
        "train.steps=1",
        *QUIET,
    ]
    assert main(["prefopt", *args]) == 0
    assert main(["ref-logps", *args]) == 0  # the same key: reused
    assert "reused reference log-probs" in capsys.readouterr().out
    assert main(["ref-logps", *args, "data.chat_template_kwargs.date_string=01 Jan 2025"]) == 0
    out = capsys.readouterr().out
    assert "wrote reference log-probs" in out  # another template argument: another key
    assert len([p for p in (tmp_path / "c").iterdir() if p.is_dir()]) == 2


# ---------------------------------------------------------------------------- truncation keeps the span


def test_pairs_lose_context_from_the_left_and_unfit_pairs_are_skipped_before_step_1(family_models, tmp_path, capsys):
    from safer_jax.data.pairs import StepPair, encode_pair, fit_pair
    from safer_jax.data.pipeline import PipelineConfig, preference_dataset

    ct = ChatTokenizer(load_tokenizer(str(family_models["mistral"])))
    long_prompt = " ".join(["Tell me about the history of bridges and tunnels."] * 40)
    fits = StepPair(
        "fits",
        long_prompt,
        ("## Initial Assessment\nA history question.\n",),
        2,
        "## Rule Verification\nR21: applies.\n",
        "## Rule Verification\nR07: violated, it is prohibited.\n",
        False,
        False,
    )
    too_long = StepPair("too-long", "Hi", (), 4, " ".join(["word"] * 400), "No.", True, True)
    enc = encode_pair(ct, fits)
    seq_len = SEQ  # with batch 8 and this architecture: programs the whole-CLI test compiled already
    assert len(enc["rejected_ids"]) > seq_len  # the context must be cut
    _, dropped = fit_pair(enc, seq_len)
    assert dropped == len(enc["rejected_ids"]) - seq_len
    batch = next(iter(preference_dataset([fits], ct, PipelineConfig(seq_len=seq_len, batch_size=1, shuffle=False))))
    for row, side in ((0, "chosen"), (1, "rejected")):
        span = enc[f"{side}_ids"][enc[f"{side}_mask"] > 0]
        n = int(batch["segment_ids"][row].sum())
        got = batch["input_ids"][row, :n]
        assert got[batch["span_mask"][row, :n] > 0].tolist() == span.tolist()  # the span, whole
        assert got.tolist() == enc[f"{side}_ids"][dropped:].tolist()  # context dropped from the left
    assert fit_pair(encode_pair(ct, too_long), seq_len) is None

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p.to_json()) + "\n" for p in [fits, too_long] * 8))
    assert (
        main(
            [
                "prefopt",
                "--config",
                str(PREF_TINY),
                f"run_dir={tmp_path / 'run'}",
                f"model.path={family_models['mistral']}",
                f"data.train={pairs}",
                f"data.seq_len={seq_len}",
                "data.batch_size=8",
                "train.steps=1",
                f"preference.cache_dir={tmp_path / 'c'}",
                *QUIET,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    skip = re.search(r"skipped 8/16 pairs whose scored span does not fit data\.seq_len=" + str(SEQ), out)
    step1 = out.find("step 1/1")
    assert skip and step1 > skip.start()  # counted and printed before training starts


def test_a_trace_format_holding_an_end_of_turn_token_fails_naming_the_field(
    family_models, small_traces, tmp_path, capsys
):
    assert (
        main(
            [
                "sft",
                "--config",
                str(SFT_TINY),
                f"run_dir={tmp_path / 'r'}",
                f"model.path={family_models['qwen3']}",
                f"data.train={small_traces}",
                "data.trace_format.close_tag=</think><|im_end|>",
                *QUIET,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "data.trace_format.close_tag" in err and "<|im_end|>" in err and "Traceback" not in err
