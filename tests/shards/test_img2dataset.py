"""img2dataset's output read as it is: the real tool (its own venv, `make img2dataset`) downloads from a server on
loopback, some URLs missing and some bodies not images; its webdataset shards (KEY.jpg, KEY.txt, KEY.json with
status, NAME_stats.json and NAME.parquet beside each tar, no manifest) go through `shards inspect`, `shards verify`
and the training loader."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.runs import write_config
from helpers.shards import image_bytes

from pretrain.cli import main
from pretrain.data.loader import LoaderSpec, ResumableLoader
from pretrain.data.urls import expand_urls
from pretrain.shards.inspection import inspect_shards

IMG2DATASET = Path(__file__).resolve().parents[2] / ".venv-img2dataset" / "bin" / "img2dataset"
BODIES = {"/cat.jpg": image_bytes("JPEG", seed=1), "/dog.png": image_bytes("PNG", (24, 36), seed=2),
          "/bird.jpg": image_bytes("JPEG", (50, 20), seed=3), "/page.jpg": b"<html>not found, but 200</html>"}
ROWS = [("/cat.jpg", "a cat"), ("/gone.jpg", "missing"), ("/dog.png", "a dog"), ("/page.jpg", "html"),
        ("/bird.jpg", "a bird"), ("/also-gone.png", "missing too")]


class _Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = BODIES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def _download(server: str, root: Path) -> Path:
    assert IMG2DATASET.is_file(), f"{IMG2DATASET} is missing: `make img2dataset` installs the real tool"
    urls = root / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"{server}{path},{caption}\n" for path, caption in ROWS))
    out = root / "img2dataset"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}  # no network but loopback
    subprocess.run([str(IMG2DATASET), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url",
                    "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
                    "--processes_count", "1", "--thread_count", "2", "--resize_mode", "no",
                    "--number_sample_per_shard", "4", "--timeout", "30", "--retries", "0", "--enable_wandb", "False"],
                   check=True, capture_output=True, timeout=240, env=env)
    return out


@pytest.mark.slow
def test_img2dataset_output_is_read_as_it_is(server, tmp_path, assets, shapes, processor, tokenizer, capsys):
    out = _download(server, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    tar_json = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["successes"] for s in tar_json) == 3

    report = inspect_shards(str(out))
    assert report["num_samples"] == 3 and report["images_per_sample"] == {"1": 3}
    assert report["skipped_by_reason"] == {"failed_to_download": 2, "failed_to_resize": 1}
    assert sorted(e["caption"] for e in report["examples"]) == ["a bird", "a cat", "a dog"]

    config = write_config(tmp_path / "config.yaml", assets, shapes)
    assert main(["shards", "verify", str(out), "--config", str(config), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ok": 3, "skipped": {}}

    spec = LoaderSpec(sources=[expand_urls(str(out))], weights=[1.0], single_pass=True, max_length=64, shuffle=False)
    texts = [tokenizer.decode(b["input_ids"][0][b["attention_mask"][0].bool()])
             for b in ResumableLoader(spec, processor)]
    captions = ["a bird", "a cat", "a dog"]
    assert sorted(next(c for c in captions if c in text) for text in texts) == captions
