"""Where a logged step goes besides metrics.jsonl (`run.trackers`): TensorBoard, Weights & Biases, MLflow.

Every tracker is a sink with the same calls: `scalars(step, {tag: value})`, `caption(step, tag, image, text)`,
`close()`. Tags are TensorBoard's (`train/loss`, `lr/llm`, `val/loss`, ...) in every tool. Each tool is configured
by its own environment variables (WANDB_PROJECT, WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME, ...), read by the tool itself.

TensorBoard writes local files (through its own writer thread) and is called in line. W&B and MLflow talk to a
server, so each runs on a thread of its own behind a bounded queue (`Background`): the training thread only
enqueues; a full queue drops the record and counts it; the first failure (server down, no network, no key) warns
once, and the tracker is off for the rest of the run; training never waits for it beyond `CLOSE_TIMEOUT_S` at the
end.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import secrets
import string
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
QUEUE_SIZE = 1000  # logged steps (plus captions) a tracker may fall behind before records are dropped
CLOSE_TIMEOUT_S = 30.0  # at the end of a run: how long the trackers get to deliver what is queued
# MLflow limits (its REST API): parameters per request and the longest value stored.
_MLFLOW_BATCH, _MLFLOW_VALUE_CHARS = 100, 6000
# Every logged step has this tag: a resumed MLflow run reads where its history ends from it.
STEP_TAG = "train/step_time_s"
RUN_KEY_TAG = "pretrain.run_key"


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events an interrupted attempt wrote after the checkpoint resumed.
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.tb.add_scalar(tag, v, step)

    def caption(self, step: int, tag: str, image: np.ndarray, text: str) -> None:
        self.tb.add_image(tag, image, step, dataformats="HWC")
        self.tb.add_text(tag, text, step)

    def close(self) -> None:
        self.tb.close()

    def resume_ids(self) -> dict[str, str]:
        return {}


class WandbSink:
    """A W&B run; without an API key (and no WANDB_MODE) it runs offline into the run directory (`wandb sync` it
    later). The run id is chosen here, before the server answers, so the first checkpoint can keep it."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_name: str, resumed: dict[str, str],
                 logged_through: int) -> None:
        _require("wandb")
        self.run_dir, self.config, self.run_name = run_dir, config, run_name
        run_id = resumed.get("wandb")
        self.run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.run = None
        # The steps an interrupted attempt logged past the checkpoint being resumed were sent already (an offline
        # run cannot ask the server; an online one also learns the run's own end from W&B).
        self.history_end = logged_through if run_id else 0

    def open(self) -> None:
        import wandb

        offline = "WANDB_MODE" not in os.environ and not _wandb_key()
        if offline:
            log.info("wandb: no API key: logging offline into %s (upload later with `wandb sync`)", self.run_dir)
        self.run = wandb.init(
            id=self.run_id, resume="allow", config=self.config, mode="offline" if offline else None,
            dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
            project=None if os.environ.get("WANDB_PROJECT") else "pretrain",
            name=None if os.environ.get("WANDB_NAME") else self.run_name)
        self.history_end = max(self.history_end, self.run.step - 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if step > self.history_end:
            self.run.log(values, step=step)

    def caption(self, step: int, tag: str, image: np.ndarray, text: str) -> None:
        import wandb

        if step > self.history_end:
            self.run.log({tag: wandb.Image(image, caption=text)}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()

    def resume_ids(self) -> dict[str, str]:
        return {"wandb": self.run_id}


def _require(module: str) -> None:
    """Installed or not, without importing it on the training thread (the tracker's thread imports it)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"no module named {module!r}")


def _wandb_key() -> bool:
    """An API key in WANDB_API_KEY or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MlflowSink:
    """An MLflow run at MLFLOW_TRACKING_URI, in MLFLOW_EXPERIMENT_NAME (or _ID); resumed by id, or, where the server
    had not answered before the checkpoint was written, found by the tag `pretrain.run_key` that this sink chose
    when it started (kept in the checkpoint from the first one on). Parameters are the
    flattened config (a resumed run adds the keys it lacks: MLflow refuses to change a logged parameter), the
    resolved config also as the artifact config.yaml; captions as step images and text artifacts."""

    name = "mlflow"

    def __init__(self, config: dict[str, Any], config_yaml: str, run_name: str, resumed: dict[str, str]) -> None:
        _require("mlflow")
        self.config, self.config_yaml, self.run_name = config, config_yaml, run_name
        self.run_id: str | None = resumed.get("mlflow")
        self.resumed_key = resumed.get("mlflow_key")
        self.key = self.resumed_key or secrets.token_hex(16)
        self.client = None
        self.history_end = 0  # the last step the run already holds (a resumed run does not send it again)

    def open(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment = _mlflow_experiment(self.client)
        if not self.run_id and self.resumed_key:
            found = self.client.search_runs([experiment], f"tags.`{RUN_KEY_TAG}` = '{self.resumed_key}'")
            self.run_id = found[0].info.run_id if found else None
        if self.run_id:
            run = self.client.get_run(self.run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, STEP_TAG)
            self.history_end = max((m.step for m in history), default=0)
        else:
            run = self.client.create_run(experiment, run_name=self.run_name, tags={RUN_KEY_TAG: self.key})
            self.run_id = run.info.run_id
        have = run.data.params
        params = [Param(k, v) for k, v in _flatten(self.config).items() if k not in have]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _MLFLOW_BATCH])
        self.client.log_text(self.run_id, self.config_yaml, "config.yaml")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.history_end:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def caption(self, step: int, tag: str, image: np.ndarray, text: str) -> None:
        if step <= self.history_end:
            return
        self.client.log_image(self.run_id, image, key=tag.replace("/", "_"), step=step)
        self.client.log_text(self.run_id, text, f"captions/{tag}/step_{step:08d}.md")

    def close(self) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, "FINISHED")

    def resume_ids(self) -> dict[str, str]:
        return {"mlflow_key": self.key, **({"mlflow": self.run_id} if self.run_id else {})}


def _mlflow_experiment(client: Any) -> str:
    """MLFLOW_EXPERIMENT_ID, else MLFLOW_EXPERIMENT_NAME (created when missing), else MLflow's default experiment."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return "0"
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:_MLFLOW_VALUE_CHARS]
    return out


class Background:
    """A tracker on a thread of its own: `open` and every call run there, in order. The training thread only
    enqueues (never blocks); what does not fit is dropped and counted; the first error warns once and turns the
    tracker off (what it would still have sent is counted too)."""

    def __init__(self, sink: Any, maxsize: int = QUEUE_SIZE) -> None:
        self.sink, self.name = sink, sink.name
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.dropped = 0  # records the training thread could not enqueue (a full queue, a failed tracker)
        self.lost = 0  # records the tracker's thread discarded after a failure
        self.failed = False
        self._warned = threading.Lock()
        self.thread = threading.Thread(target=self._work, name=f"tracker-{self.name}", daemon=True)
        self.thread.start()
        self._put(("open",))

    def resume_ids(self) -> dict[str, str]:
        return self.sink.resume_ids()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._put(("scalars", step, values))

    def caption(self, step: int, tag: str, image: np.ndarray, text: str) -> None:
        self._put(("caption", step, tag, image, text))

    def _put(self, item: tuple) -> None:
        if self.failed:
            self.dropped += 1
            return
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            op, *args = self.queue.get()
            if op == "stop":
                return
            if self.failed:
                self.lost += op != "close"
                continue
            try:
                getattr(self.sink, op)(*args)
            except Exception as err:  # any failure of the tool: training goes on without it
                self.failed = True
                self.lost += op != "close"
                self._warn(f"{type(err).__name__}: {err}")

    def _warn(self, why: str) -> None:
        if self._warned.acquire(blocking=False):  # once per tracker, from whichever thread comes first
            log.warning("%s: tracker failed (%s); training goes on without it", self.name, why[:500])

    def close(self, deadline: float) -> None:
        """Deliver what is queued and close the tool's run, until `deadline` (time.monotonic()); then leave it."""
        for item in (("close",), ("stop",)):
            try:
                self.queue.put(item, timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Full:
                break
        self.thread.join(max(deadline - time.monotonic(), 0.0))
        if self.thread.is_alive():
            self._warn(f"still delivering after {CLOSE_TIMEOUT_S:.0f}s at the end of the run; left behind")
        if self.dropped + self.lost:
            log.info("%s: %d records not delivered", self.name, self.dropped + self.lost)


def open_trackers(names: list[str], run_dir: Path, start_step: int, logged_through: int, config: dict[str, Any],
                  config_yaml: str, run_name: str, resumed: dict[str, str]) -> list[Any]:
    """The sinks of `run.trackers` (rank 0 only). `resumed`: the W&B / MLflow runs a resumed run continues;
    `logged_through`: the last step metrics.jsonl held before the steps past the checkpoint were dropped."""
    sinks: list[Any] = []
    for name in names:
        try:
            if name == "tensorboard":
                sinks.append(TensorBoardSink(run_dir, start_step))
            elif name == "wandb":
                sinks.append(Background(WandbSink(run_dir, config, run_name, resumed, logged_through)))
            elif name == "mlflow":
                sinks.append(Background(MlflowSink(config, config_yaml, run_name, resumed)))
        except ImportError as err:
            log.warning("%s: tracker not installed (%s; `pip install 'pretrain[trackers]'`); training goes on "
                        "without it", name, err)
    return sinks
