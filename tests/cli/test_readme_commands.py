"""Every `pretrain ...` command in the ```bash blocks of README.md and slurm/README.md runs as written, in order,
against local stand-ins, so a README change that breaks a command fails the suite.

Stand-ins (the only changes made to a command): the recipes' hub models are the tiny local ones; the LLaVA JSON is
32 synthetic records cut into shards of 8 (shard `000111` of the real set is `000003` here); the Hub tables are two
rows each in their schemas; `--nproc 8` GPUs are 2 CPU ranks with 4x the accumulation (the same global batch);
`--workers 16` is 2; `pretrain submit` gets `--dry-run` (no sbatch here); training runs stop after 1 step with one
loader worker.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.runs import ROOT
from PIL import Image

from pretrain.shards.synthetic import make_sample

pytestmark = pytest.mark.slow

READMES = (ROOT / "README.md", ROOT / "slurm" / "README.md")


def readme_commands(path: Path) -> list[str]:
    """The `pretrain` lines of the file's ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("pretrain "):
                commands.append(line.strip())
    return commands


def _stand_in_configs(cwd: Path, assets: dict) -> None:
    for src in (ROOT / "configs").rglob("*.yaml"):
        tree = yaml.safe_load(src.read_text())
        for key, tiny in (("llm", assets["llama"]), ("vision", assets["clip"])):
            value = tree["model"][key]
            if isinstance(value, str) and not value.startswith("demo_out/"):
                tree["model"][key] = str(tiny)
        out = cwd / "configs" / src.relative_to(ROOT / "configs")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(tree).replace("000111", "000003"))


def _stand_in_data(cwd: Path, assets: dict, shapes: dict) -> None:
    (cwd / "images").mkdir()
    records = []
    for i in range(32):
        sample = make_sample("train", i)
        (cwd / "images" / f"{i:03d}.png").write_bytes(sample["png"])
        caption = json.loads(sample["json"])["caption"]
        records.append({"id": f"{i:03d}", "image": f"{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": caption}]})
    (cwd / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    Image.open(io.BytesIO(make_sample("val", 0)["png"])).convert("RGB").save(cwd / "cat.jpg")
    (cwd / "site.sh").write_text("export SITE_READY=1\n")
    demo = cwd / "demo_out"
    (demo / "assets").mkdir(parents=True)
    (demo / "assets" / "llm").symlink_to(assets["llama"])
    (demo / "assets" / "vision").symlink_to(assets["clip"])
    (demo / "data").mkdir()
    for split in ("train", "val"):
        (demo / "data" / split).symlink_to(shapes[split]["dir"])
    _stand_in_tables(cwd)


def _stand_in_tables(cwd: Path) -> None:
    """The Hub tables the README names, two rows each in their real schemas."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [{"bytes": make_sample("train", i)["png"], "path": None} for i in range(2)]
    turns = [[{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Shapes."}]] * 2
    onevision = cwd / "LLaVA-OneVision-Data" / "CLEVR-Math(MathV360K)"
    onevision.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"], "image": images, "conversations": turns}),
                   onevision / "train-00000-of-00001.parquet")
    (cwd / "the_cauldron" / "ai2d").mkdir(parents=True)
    texts = [[{"user": "What?", "assistant": "Shapes."}]] * 2
    pq.write_table(pa.table({"images": [[i] for i in images], "texts": texts}),
                   cwd / "the_cauldron" / "ai2d" / "train-00000-of-00001.parquet")
    features = datasets.Features({"image": datasets.Image(), "conversations": datasets.List(
        {"from": datasets.Value("string"), "value": datasets.Value("string")})})
    datasets.Dataset.from_dict({"image": images, "conversations": turns}, features=features).save_to_disk(
        str(cwd / "my_dataset_saved_to_disk"))
    pq.write_table(pa.table({"jpg": [i["bytes"] for i in images], "alt": ["Shapes.", "More shapes."]}),
                   cwd / "coco.parquet")


def local_command(line: str, cwd: Path) -> list[str]:
    words = [w.replace("000111", "000003").replace("~/site.sh", str(cwd / "site.sh"))
             for w in shlex.split(line, comments=True)]
    sub = words[1]
    if "--nproc" in words:
        i = words.index("--nproc") + 1
        if int(words[i]) > 2:
            words += [f"train.grad_accum={int(words[i]) // 2}"]
            words[i] = "2"
    if "--workers" in words:
        words[words.index("--workers") + 1] = "2"
    if words[1:3] == ["shards", "llava"]:
        words += ["--samples-per-shard", "8"]
    if sub == "submit" and "--dry-run" not in words:
        words.append("--dry-run")
    if sub in ("train", "launch"):
        words += ["train.max_steps=1", "data.num_workers=1"]
    return [sys.executable, "-m", *words]


# Commands other than training (which ends its process with os._exit) run in this interpreter, through the same
# `pretrain.cli.main`: each saves an interpreter start and the library imports.
SUBPROCESS = {"train", "launch"}


def _run(line: str, cwd: Path, env: dict, capfd) -> tuple[int, str]:
    cmd = local_command(line, cwd)
    if cmd[3] not in SUBPROCESS:
        from pretrain.cli import main

        capfd.readouterr()
        code = main(cmd[3:])
        out = capfd.readouterr()
        return code, out.err + out.out
    try:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{line}\ndid not finish in 600 s:\n{err.stdout}\n{err.stderr}")
    return out.returncode, out.stderr + out.stdout  # stdout last: a command's last line is its result


def test_every_readme_command_runs_as_written(tmp_path, assets, shapes, capfd, monkeypatch):
    # Each distinct command once (the launch example is in both files).
    distinct = {tuple(shlex.split(c, comments=True)): c for readme in READMES for c in readme_commands(readme)[::-1]}
    commands = list(dict.fromkeys(distinct[tuple(shlex.split(c, comments=True))]
                                  for readme in READMES for c in readme_commands(readme)))
    subs = {c.split()[1] for c in commands}
    assert {"shards", "train", "launch", "submit", "convert", "generate", "eval", "plan"} <= subs, subs
    _stand_in_configs(tmp_path, assets)
    _stand_in_data(tmp_path, assets, shapes)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outputs, seconds = {}, {}
    for line in commands:
        start = time.perf_counter()
        code, outputs[line] = _run(line, tmp_path, env, capfd)
        seconds[line] = time.perf_counter() - start
        assert code == 0, f"{line}\n(ran {shlex.join(local_command(line, tmp_path)[2:])})\n{outputs[line][-6000:]}"
    print("\n".join(f"{s:6.1f} s  {line}" for line, s in seconds.items()))  # shown with -s or on failure
    # What the commands did, not only that they exited 0.
    text = "\n".join(outputs.values())
    assert "warm-up clamped to 1 steps" in text  # the recipe's 65-step warm-up on a short run
    assert (tmp_path / "runs" / "try" / "checkpoints" / "latest").is_file()
    assert (tmp_path / "runs" / "llava15-7b-stage1" / "hf" / "config.json").is_file()
    generated = next(v for k, v in outputs.items() if k.startswith("pretrain generate"))
    assert "cat.jpg\t" in generated
    evaluated = next(v for k, v in outputs.items() if k.startswith("pretrain eval"))
    assert json.loads(evaluated.strip().splitlines()[-1])["val"]["loss"] > 0
    assert sum("#SBATCH --nodes=" in v for k, v in outputs.items() if k.startswith("pretrain submit")) >= 3
    assert (tmp_path / "demo_out" / "run" / "DONE").is_file()
    for built in ("clevr_math", "cauldron", "mine", "coco"):  # the Hub tables' shards
        assert json.loads((tmp_path / "data" / built / "manifest.json").read_text())["num_samples"] == 2
