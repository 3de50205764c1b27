"""W&B and MLflow for real: one lone-process run logs to TensorBoard, W&B (no key: offline files in the run directory)
and an MLflow tracking server the test starts on loopback (a sqlite store), stops after a NaN step past its
checkpoint, and is resumed; the server is killed in the middle of the resumed run. The tools' own records are read
back (MLflow's client, W&B's protobuf records) and compared with metrics.jsonl: same steps, same values, each step
once, one run id across the resume. `pretrain report` draws that run."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import wandb_files
from helpers.faults import fault_env
from helpers.runs import ROOT, metrics, write_config
from helpers.trainer import kill_tree, wait_for

from pretrain.train import checkpoint as ckpt
from pretrain.train.report import write_report
from pretrain.train.trackers import Background, MlflowSink

FAILED = "mlflow: tracker failed"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow(root: Path) -> tuple[subprocess.Popen, str, Path]:
    port, db = _free_port(), root / "mlflow.db"
    # No background job runner (a test server), no usage telemetry (no network in tests).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=root, env=env,
                            stdout=open(root / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", db


def _server_up(uri: str) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(uri + "/health", timeout=2).status == 200
    except OSError:
        return False


def _train_alone(config: Path, env: dict, overrides: list[str] = ()) -> subprocess.Popen:
    """`pretrain train` as a lone process (world size 1), its output in a file beside the config."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not
             k.startswith(("WANDB_", "MLFLOW_"))}
    out = open(config.parent / f"train{len(list(config.parent.glob('train*.log')))}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "pretrain", "train", str(config), *overrides], cwd=ROOT,
                            env={**clean, "OMP_NUM_THREADS": "2", **env}, stdout=out, stderr=subprocess.STDOUT)


def _mlflow_state(client, experiment: str) -> dict:
    """The runs of the experiment with their params and every metric's history {key: [(step, value), ...]}."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    out = {}
    for r in runs:
        keys = list(r.data.metrics)
        out[r.info.run_id] = {"status": r.info.status, "params": r.data.params,
                              "metrics": {k: sorted((m.step, m.value) for m in client.get_metric_history(
                                  r.info.run_id, k)) for k in keys}}
    return out


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, assets, shapes):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("trackers")
    server, uri, db = _start_mlflow(root)  # starts while the first run imports and builds its model
    try:
        cfg = write_config(root / "c.yaml", assets, shapes, **{
            "run.trackers": ["tensorboard", "wandb", "mlflow"], "run.name": "tracked", "train.max_steps": 6,
            "checkpoint.every_steps": 2, "train.val_every": 2, "train.val_batches": 1, "train.val_captions": 1,
            "train.val_caption_tokens": 4, "train.max_nonfinite_in_row": 1})
        env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "tracked", "MLFLOW_DISABLE_TELEMETRY": "true",
               "NETRC": str(root / "no-netrc")}
        # First attempt: a NaN loss at step 4 stops it after step 3 was logged past the checkpoint of step 2.
        first = _train_alone(cfg, {**env, **fault_env({"nan_steps": [4]})})
        wait_for(lambda: _server_up(uri), 240, "MLflow server")
        assert first.wait(timeout=300) != 0
        client = MlflowClient(uri)
        after_first = _mlflow_state(client, "tracked")
        first_rows = metrics(root / "run")
        # A checkpoint written before the server answered holds only the key the sink chose: it finds the run.
        kept = ckpt.read_rank_state(root / "run" / "checkpoints" / ckpt.tag_for(2), 0)["trainer"]["tracker_runs"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.setenv("MLFLOW_EXPERIMENT_NAME", "tracked")
            mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
            by_key = MlflowSink({}, "", "tracked", {"mlflow_key": kept["mlflow_key"]})
            by_key.open()
        # Second attempt resumes at step 2; the server dies once it holds step 4, while steps 5-6 are slowed.
        second = _train_alone(cfg, {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                    **fault_env({"step_sleep": 1.0, "step_sleep_from": 5})},
                              ["train.val_every=0"])
        (run_id,) = after_first

        deadline = time.monotonic() + 240
        while not any(m.step == 4 for m in client.get_metric_history(run_id, "train/loss")):
            if second.poll() is not None or time.monotonic() > deadline:
                kill_tree(second.pid)
                pytest.fail(f"the resumed attempt logged no step 4 into MLflow run {run_id} (runs now: "
                            f"{list(_mlflow_state(client, 'tracked'))}):\n"
                            f"{(root / 'train1.log').read_text()[-4000:]}")
            time.sleep(0.2)
        kill_tree(server.pid)
        server.wait(timeout=30)
        code = second.wait(timeout=300)
        logs = [(root / f"train{i}.log").read_text() for i in (0, 1)]
        assert code == 0, logs[1][-5000:]
        # The server is gone; its sqlite store is read directly.
        after_second = _mlflow_state(MlflowClient(f"sqlite:///{db}"), "tracked")
        return {"run": root / "run", "root": root, "first": after_first, "second": after_second, "logs": logs,
                "first_rows": first_rows, "run_id": run_id, "by_key": (by_key.run_id, by_key.history_end)}
    finally:
        kill_tree(server.pid)


def _expected(tracked: dict) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tracker series: {train/<key>: [(step, value)]} for every number. The steps the first attempt
    logged past its checkpoint were sent then and are not sent again: the trackers keep those (equal losses on a
    deterministic run; the timings are the first attempt's), metrics.jsonl the redone ones."""
    first = tracked["first_rows"]
    rows = first + [r for r in metrics(tracked["run"]) if r["step"] > first[-1]["step"]]
    out: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                out.setdefault(f"train/{k}", []).append((r["step"], float(v)))
    return out


@pytest.mark.slow
def test_mlflow_gets_the_metrics_jsonl_values_params_and_captions_and_one_run_across_the_resume(tracked):
    first, second = tracked["first"], tracked["second"]
    assert [r["step"] for r in tracked["first_rows"]] == [1, 2, 3]
    (run_id,) = first
    assert list(second) == [run_id]  # the resumed attempt continued the same MLflow run
    params = first[run_id]["params"]
    assert params["run.name"] == "tracked" and params["train.max_steps"] == "6"
    assert params["run.trackers"] == "['tensorboard', 'wandb', 'mlflow']"
    want = _expected(tracked)
    assert [v for s, v in want["train/loss"]] == [r["loss"] for r in metrics(tracked["run"])]  # redone == first
    got = first[run_id]["metrics"]
    for key, series in want.items():
        assert got[key] == [p for p in series if p[0] <= 3], key
    assert got["val/loss"][0][0] == 2 and "lr/llm" in got
    held = second[run_id]["metrics"]
    for key, series in want.items():  # each step once; the server died after step 4, before the run ended
        steps = [s for s, _ in held[key]]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4, (key, steps)
        assert held[key] == series[: len(steps)], key
    assert second[run_id]["status"] == "RUNNING"  # the run never got to say FINISHED
    assert tracked["by_key"] == (run_id, 3)  # found by its key alone, and where its history ends


@pytest.mark.slow
def test_mlflow_caption_image_and_text_are_artifacts(tracked):
    run_id = tracked["run_id"]
    art = next(tracked["root"].glob(f"mlartifacts/*/{run_id}/artifacts"))
    assert list(art.glob("images/val_caption_0+step+2+*.png"))
    text = (art / "captions/val/caption_0/step_00000002.md").read_text()
    assert "**model:**" in text and "**truth:**" in text
    assert "run:" in (art / "config.yaml").read_text()


@pytest.mark.slow
def test_wandb_without_a_key_logs_offline_into_the_run_directory_one_run_each_step_once(tracked):
    run = tracked["run"]
    segments = wandb_files.offline_runs(run)
    assert len(segments) == 2  # one offline segment per attempt, the same W&B run id
    ids = set().union(*(wandb_files.run_ids(p) for p in segments))
    assert len(ids) == 1
    state = ckpt.read_rank_state(run / "checkpoints" / ckpt.tag_for(6), 0)
    runs = state["trainer"]["tracker_runs"]
    assert runs["wandb"] == ids.pop() and runs["mlflow"] == tracked["run_id"] and len(runs["mlflow_key"]) == 32
    histories = [wandb_files.history(p) for p in segments]
    assert sorted(histories[0]) == [1, 2, 3] and sorted(histories[1]) == [4, 5, 6]  # no step sent twice
    merged = {**histories[0], **histories[1]}
    for key, series in _expected(tracked).items():
        assert [(s, float(merged[s][key])) for s, _ in series] == series, key
    assert merged[2]["val/caption_0/_type"] == "image-file" and "**model:**" in merged[2]["val/caption_0/caption"]
    assert "val/loss" in merged[2] and "lr/llm" in merged[2]
    config = wandb_files.config(segments[0])
    assert config["run"]["name"] == "tracked" and config["train"]["max_steps"] == 6


@pytest.mark.slow
def test_a_server_killed_mid_run_warns_once_and_training_finishes(tracked):
    first, second = tracked["logs"]
    assert FAILED not in first
    assert second.count(FAILED) == 1, second[-4000:]
    assert "resumed from" in second and (tracked["run"] / "DONE").is_file()
    assert [r["step"] for r in metrics(tracked["run"])] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_report_draws_the_run_with_its_resume(tracked, tmp_path):
    resumes = [json.loads(line) for line in (tracked["run"] / "resumes.jsonl").read_text().splitlines()]
    assert [(r["step"], r["logged_through"]) for r in resumes] == [(2, 3)]
    png, page = write_report(tracked["run"], tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size == (1500, 800)
    text = page.read_text()
    assert "<svg" in text and "from step 2 (1 logged steps redone)" in text and "resumed" in text


def test_report_of_a_directory_without_metrics_says_what_it_needs(tmp_path):
    from pretrain.cli import main

    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.slow  # MLflow's first import runs `uname -p` (platform.platform() in its telemetry schema)
def test_a_server_that_never_answers_never_blocks_logging_drops_and_counts_warns_once(tmp_path, monkeypatch,
                                                                                        caplog):
    """A real MLflow client against a socket that accepts and never replies: the tracker's thread hangs in its
    first request; the training thread's calls return at once, the queue's overflow is dropped and counted."""
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(8)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(black_hole.accept()[0]), daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{black_hole.getsockname()[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")
    sink = Background(MlflowSink({"train": {"lr": 1}}, "", "hangs", {}), maxsize=4)
    deadline = time.monotonic() + 120
    while not accepted and time.monotonic() < deadline:  # the tracker's thread is inside its first request
        time.sleep(0.05)
    assert accepted
    with caplog.at_level(logging.INFO, logger="pretrain.train.trackers"):
        for step in range(1, 11):
            sink.scalars(step, {"train/loss": 1.0 / step})
        assert sink.dropped == 6  # 4 queued, 6 dropped
        sink.close(time.monotonic() + 0.5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "left behind" in warnings[0].getMessage()
    black_hole.close()
    for conn in accepted:
        conn.close()

