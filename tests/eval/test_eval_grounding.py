"""Proof that the image path learns: the tiny demo model trained on the synthetic shapes (ZeRO-3, 2 CPU
ranks, captioning + image-text contrastive) names the colour, count and position of held-out images well above
chance, pays a clear loss for shuffled images, and retrieves captions far above chance; the same run with the image
features zeroed (a broken image path; the text priors are all it can learn) fails every one of these checks, so the
checks can fail. Everything goes through the user's commands: `pretrain launch`, then `pretrain eval`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.faults import fault_env
from helpers.runs import ROOT, launch

pytestmark = pytest.mark.slow

# The demo recipe plus what the tiny model needs to read colour (see the demo notes in the eval report): a 10x lower
# learning rate for the vision tower (at 3e-3 Adam wipes the tower's colour features), and the contrastive objective.
TRAIN = ["train.lr=2e-3", "train.lr_multipliers={vision: 0.1}", "objectives.contrastive_weight=0.5",
         "train.val_every=0", "checkpoint.every_steps=0", "train.log_every=50", "train.progress_bar=false",
         "data.num_workers=0"]
BROKEN = fault_env({"zero_image_features": True})


def grounding_problems(result: dict) -> list[str]:
    """What a model that learned from the images must show; each failed check is one line."""
    problems = []
    attrs = result["captioning"]["attributes"]
    for a in ("color", "count", "position"):
        if attrs[a] < 0.6:
            problems.append(f"{a} accuracy {attrs[a]:.2f} < 0.6 (chance <= 1/3)")
    if attrs["mean"] < 2 * attrs["chance_mean"]:
        problems.append(f"mean attribute accuracy {attrs['mean']:.2f} < 2 x chance {attrs['chance_mean']:.2f}")
    if result["val"]["image_gap"] < 0.5:
        problems.append(f"image-ablation gap {result['val']['image_gap']:.3f} nats < 0.5")
    r = result["retrieval"]
    for d in ("i2t_r1", "t2i_r1"):
        if r[d] < max(0.2, 10 * r["chance_r1"]):
            problems.append(f"{r['method']} retrieval {d} {r[d]:.3f} not >> chance {r['chance_r1']:.3f}")
    return problems


def _evaluate(run_dir, *args: str, env: dict | None = None) -> dict:
    import os

    cmd = [sys.executable, "-m", "pretrain", "eval", str(run_dir / "config.yaml"), "--checkpoint", str(run_dir), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    """The demo's own data and tiny model (pretrain.demo.prepare): 4000 training images, 200 held out."""
    from pretrain.demo import prepare

    root = tmp_path_factory.mktemp("demo")
    return root, prepare(root, 4000, 200)


def _train(demo_assets, name: str, steps: int, env: dict | None = None):
    """The demo recipe (its 300-step schedule) stopped after `steps`: half-way, its learning rate still high, the
    model already passes every check (run to the end of a 150-step schedule instead, it does not)."""
    root, paths = demo_assets
    run_dir = root / name
    overrides = [f"{k}={v}" for k, v in paths.items() if k != "run.output_dir"]
    overrides += [f"run.output_dir={run_dir}", "train.max_steps=300", f"train.stop_at_step={steps}", *TRAIN]
    out = launch(ROOT / "configs" / "demo.yaml", overrides=overrides, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def trained(demo_assets):
    run_dir = _train(demo_assets, "run", 150)
    return run_dir, _evaluate(run_dir, "--samples", "100")


def test_demo_model_is_grounded_in_the_images(trained):
    _, result = trained
    assert grounding_problems(result) == []
    assert result["step"] == 150 and result["samples"] == 100
    assert result["retrieval"]["method"] == "contrastive" and result["retrieval"]["n"] == 100
    cap = result["captioning"]
    assert cap["bleu4"] > 50 and cap["cider"] > 3  # near-exact captions of a 180-caption language
    assert 0 <= result["vqa"]["exact_match"] <= 1 and result["vqa"]["n"] == 400  # caption-only training: no QA


def test_caption_likelihood_retrieval_also_beats_chance(trained):
    run_dir, _ = trained
    r = _evaluate(run_dir, "--samples", "40", "--tasks", "retrieval", "--retrieval", "likelihood")["retrieval"]
    assert r["method"] == "likelihood" and r["n"] == 40
    assert min(r["i2t_r1"], r["t2i_r1"]) > 5 * r["chance_r1"]


def test_a_broken_image_path_fails_every_check(demo_assets):
    """Image features zeroed in training and evaluation: only the text priors can be learned. Trained for a third
    of the steps: a model that cannot see does not get better at seeing with more of them."""
    run_dir = _train(demo_assets, "blind", 50, env=BROKEN)
    result = _evaluate(run_dir, "--samples", "100", "--tasks", "loss,captioning,retrieval", env=BROKEN)
    problems = grounding_problems(result)
    assert len(problems) == 7, problems  # 3 attributes, the mean, the gap, retrieval both ways
    assert abs(result["val"]["image_gap"]) < 1e-6
