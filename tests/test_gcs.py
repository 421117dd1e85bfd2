"""Run folders in a bucket, end to end against a local GCS API emulator (gcp-storage-emulator,
with the download headers tensorstore needs: tests/gcs_emulator.py).

The emulator is started on 127.0.0.1 on a free port by the module fixture and stopped after;
gcsfs (epath's `gs://` backend) and tensorstore (orbax's array writer) are pointed at it by
STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL. What reached the bucket is checked
through the emulator's own JSON API, not through our path layer.
"""

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from safer_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
SFT_TINY = ROOT / "configs" / "sft" / "tiny.yaml"
PREF_TINY = ROOT / "configs" / "prefopt" / "tiny.yaml"
BUCKET = "safer-jax-test"  # tensorstore wants 3 to 63 characters
SFT_ARGS = [
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "data.seq_len=192",
    "data.batch_size=8",
    "optimizer.schedule=constant",
]


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's URL, with this process's environment pointed at it and a fresh working folder."""
    base = tmp_path_factory.mktemp("gcs")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(base / "emulator.log", "w")  # noqa: SIM115 (closed when the emulator stops)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "gcs_emulator.py"),
            "start",
            "--host=127.0.0.1",
            f"--port={port}",
            "--in-memory",
            f"--default-bucket={BUCKET}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (base / "emulator.log").read_text()
                time.sleep(0.1)
        env = {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_CLOUD_PROJECT": "safer-jax-test",
            "SAFER_JAX_CACHE": str(base / "local-cache"),
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        cwd = os.getcwd()
        (base / "cwd").mkdir()
        os.chdir(base / "cwd")  # a stray local folder named `gs:` would appear here
        try:
            yield url
        finally:
            os.chdir(cwd)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            assert not (base / "cwd" / "gs:").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def objects(url: str, prefix: str) -> dict[str, int]:
    """{object name: size} under `prefix`, from the emulator's JSON API."""
    q = urllib.parse.urlencode({"prefix": prefix})
    doc = json.loads(urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{q}").read())
    return {o["name"]: int(o["size"]) for o in doc.get("items", [])}


def read_object(url: str, name: str) -> str:
    q = urllib.parse.quote(name, safe="")
    return urllib.request.urlopen(f"{url}/download/storage/v1/b/{BUCKET}/o/{q}?alt=media").read().decode()


def train_losses(url: str, run: str) -> dict[int, float]:
    rows = [json.loads(x) for x in read_object(url, f"{run}/metrics.jsonl").splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def sft(run: str, *extra: str) -> list[str]:
    return ["sft", "--config", str(SFT_TINY), f"run_dir=gs://{BUCKET}/{run}", *SFT_ARGS, *extra]


@pytest.fixture(scope="module")
def sft_full(gcs):
    assert main(sft("full")) == 0
    return "full"


def test_an_unwritable_local_run_dir_fails_before_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    bad = tmp_path / "a-file" / "run"
    assert main(["sft", "--config", str(SFT_TINY), f"run_dir={bad}", *SFT_ARGS]) == 2
    out, err = capsys.readouterr()
    assert f"run_dir={bad}: cannot write there" in err and "setup" not in out + err


def test_a_missing_bucket_fails_before_step_one(gcs, capsys):
    t0 = time.time()
    assert main(sft("run", "run_dir=gs://no-such-bucket-here/run")) == 2
    out, err = capsys.readouterr()
    assert "gs://no-such-bucket-here" in err and "cannot write" in err
    assert "training steps" not in out + err and "setup" not in out + err
    assert time.time() - t0 < 60
    assert not Path("gs:").exists()


def test_sft_writes_checkpoints_logs_tensorboard_config_and_export_to_the_bucket(gcs, sft_full):
    names = objects(gcs, f"{sft_full}/")
    rel = {n[len(sft_full) + 1 :]: s for n, s in names.items()}
    for f in (
        "config.yaml",
        "versions.json",
        "metrics.jsonl",
        "tokenizer/tokenizer_config.json",
        "export/model.safetensors",
        "export/config.json",
        "export/tokenizer_config.json",
    ):
        assert rel.get(f, 0) > 0, (f, sorted(rel))
    assert any(n.startswith("tensorboard/events.out.tfevents.") and s > 0 for n, s in rel.items()), sorted(rel)
    steps = {n.split("/")[1] for n in rel if n.startswith("checkpoints/")}
    assert {"2", "4"} <= steps, steps
    assert sorted(train_losses(gcs, sft_full)) == [1, 2, 3, 4]
    assert not Path("gs:").exists()


class _Crash(RuntimeError):
    pass


def test_a_rerun_resumes_from_the_bucket_with_the_losses_of_an_uninterrupted_run(gcs, sft_full, capsys):
    from safer_jax.config import SFTConfig, load_config
    from safer_jax.training.sft_loop import train_sft

    def crash(step, state, metrics):
        if step == 2:  # after the step-2 checkpoint was issued: the machine dies
            raise _Crash

    args = sft("run", f"model.path=gs://{BUCKET}/{sft_full}/tiny-model")  # the same tiny model, not built again
    with pytest.raises(_Crash):
        train_sft(load_config(SFTConfig, str(SFT_TINY), args[3:]), hooks=[crash])
    capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert f"resumed from gs://{BUCKET}/run/checkpoints at step 2" in out + err
    full, resumed = train_losses(gcs, sft_full), train_losses(gcs, "run")
    assert sorted(resumed) == [1, 2, 3, 4]  # the first run's rows are kept
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]


def test_prefopt_from_a_bucket_model_and_cache_reuses_both_on_a_rerun(gcs, sft_full, traces, rules, capsys):
    from etils import epath

    from safer_jax import paths
    from safer_jax.data.pairs import make_pairs
    from safer_jax.training import ref_cache

    pairs = make_pairs(traces[:8], rules, seed=0)
    epath.Path(f"gs://{BUCKET}/data/pairs.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs))

    def prefopt(run):
        return [
            "prefopt",
            "--config",
            str(PREF_TINY),
            f"run_dir=gs://{BUCKET}/{run}",
            f"model.path=gs://{BUCKET}/{sft_full}/export",
            f"data.train=gs://{BUCKET}/data/pairs.jsonl",
            f"preference.cache_dir=gs://{BUCKET}/ref-cache",
            "train.steps=2",
            "train.log_every=1",
            "data.batch_size=4",
            "data.seq_len=320",
            "train.export_final=false",
            "train.tensorboard=false",
        ]

    forwards = ref_cache.REFERENCE_FORWARDS["batches"]
    assert main(prefopt("pref1")) == 0
    assert ref_cache.REFERENCE_FORWARDS["batches"] > forwards
    entries = [n for n in objects(gcs, "ref-cache/") if n.endswith("/ref_logps.npy")]
    assert len(entries) == 1
    downloads, forwards = paths.DOWNLOADS["folders"], ref_cache.REFERENCE_FORWARDS["batches"]
    capsys.readouterr()
    assert main(prefopt("pref2")) == 0
    assert "reference log-probs: cache hit" in capsys.readouterr().out
    assert ref_cache.REFERENCE_FORWARDS["batches"] == forwards  # no reference forward
    assert paths.DOWNLOADS["folders"] == downloads  # the model's local copy is reused
    for run in ("pref1", "pref2"):
        losses = train_losses(gcs, run)
        assert sorted(losses) == [1, 2]
        assert math.isclose(losses[1], math.log(2.0), rel_tol=1e-5)  # policy == reference at step 1
        assert any(n.startswith(f"{run}/checkpoints/2/") for n in objects(gcs, f"{run}/"))


def test_eval_writes_its_report_to_the_bucket(gcs, sft_full):
    assert (
        main(
            [
                "eval",
                "--model",
                f"gs://{BUCKET}/{sft_full}/export",
                "--out",
                f"gs://{BUCKET}/eval",
                "--limit",
                "1",
                "--max-new-tokens",
                "4",
                "--batch-size",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    rel = {n[len("eval/") :]: s for n, s in objects(gcs, "eval/").items()}
    for f in ("results.json", "report.md", "headline.png", "rates_by_category.png", "lengths.png"):
        assert rel.get(f, 0) > 0, (f, sorted(rel))
    assert json.loads(read_object(gcs, "eval/results.json"))["metrics"]["overall"]["n"] >= 1
    assert not Path("gs:").exists()
