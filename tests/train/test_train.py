"""Real 2-process DeepSpeed runs on CPU (gloo): the run directory, exact resume per ZeRO stage, failure paths."""

from __future__ import annotations

import math
import re

import pytest
from helpers.faults import fault_env
from helpers.runs import launch, losses, metrics, torchrun_train, write_config
from helpers.trainer import assert_resumed, cut_back_to

from pretrain.exit_codes import EXIT_PREEMPTED
from pretrain.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run(3)


def test_run_directory_has_the_contract_files(reference):
    rows = metrics(reference)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "data_wait_frac"):
        assert key in rows[0], key
    assert rows[0]["mfu"] is None  # CPU
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (reference / "config.yaml").is_file() and (reference / "DONE").is_file()
    assert any((reference / "tb").iterdir())
    root = reference / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert ckpt.is_committed(root / "step_00000006") and ckpt.is_committed(root / "step_00000003")
    assert {p.name for p in (root / "step_00000006").glob("trainer_rank*.pt")} == {"trainer_rank00000.pt",
                                                                                   "trainer_rank00001.pt"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exact_resume(tmp_path, reference_run, assets, shapes, stage):
    """Resumed at step 3, run to 6: every loss equals the uninterrupted run's at the same ZeRO stage, bit for bit.
    (Across stages fp32 losses agree only to ~1e-7: reduction orders differ.) At ZeRO-3 the first part is a run of
    its own that stops at step 3 (`train.stop_at_step`), started with plain torchrun (`pretrain train` under
    torchrun's own CLI, no `pretrain launch`); at stages 1 and 2 it is the shared reference run cut back to its
    checkpoint of step 3, as if it had died after that save."""
    reference = reference_run(stage)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"deepspeed.zero_stage": stage})
    if stage == 3:
        first = torchrun_train(cfg, overrides=["train.stop_at_step=3"])
        assert first.returncode == 0, first.stdout + first.stderr
        assert not (run / "DONE").exists()
    else:
        cut_back_to(reference, run, 3)
    before = metrics(run)
    assert [r["step"] for r in before] == [1, 2, 3]
    second = launch(cfg)
    assert second.returncode == 0, second.stdout + second.stderr
    assert_resumed(second.stdout + second.stderr, run, 3, before)
    got, want = losses(run), losses(reference)
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]
    assert [got[s] for s in (1, 2, 3)] == [want[s] for s in (1, 2, 3)]
    assert (run / "DONE").is_file()


def test_nonfinite_loss_skips_the_update_and_too_many_in_a_row_stop_the_run(tmp_path, assets, shapes):
    """Non-finite losses at steps 3, 5 and 6 with at most 2 in a row allowed: step 3 is skipped and training goes on
    (step 4 is finite, the count is 1), the count of a row starts again after it (step 5 alone does not stop the run),
    and steps 5-6 are 2 in a row: the run stops with an error, its last checkpoint the one of step 5."""
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"checkpoint.every_steps": 1,
                                                               "train.max_nonfinite_in_row": 2, "train.max_steps": 8})
    out = launch(cfg, env=fault_env({"nan_steps": [3, 5, 6]}))
    assert out.returncode not in (0, EXIT_PREEMPTED), out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 non-finite steps in a row" in out.stdout + out.stderr
    rows = {r["step"]: r for r in metrics(tmp_path / "run")}
    assert sorted(rows) == [1, 2, 3, 4, 5]  # step 6 stopped the run before it was logged
    assert rows[3]["loss"] is None and rows[4]["nonfinite_steps"] == 1 and math.isfinite(rows[4]["loss"])
    assert rows[5]["loss"] is None
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.find_resume(root) == root / "step_00000005" and not (tmp_path / "run" / "DONE").exists()


def test_torn_and_size_mismatched_checkpoints_are_passed_over(tmp_path, assets, shapes, reference):
    """Rank 0 is SIGKILLed half-way through writing its ZeRO optimizer shard of step 4 (a real torn file, no
    COMMITTED); then one shard of the committed step 3 is cut short (its size no longer matches COMMITTED). Resume
    passes over both, with a warning each, to step 2, and the run ends as the uninterrupted one does."""
    cfg = write_config(tmp_path / "c.yaml", assets, shapes, **{"checkpoint.every_steps": 1})
    fault = {"torn_save": {"rank": 0, "step": 4, "file": "optim_states"}}
    out = launch(cfg, env=fault_env(fault), timeout=240)
    assert out.returncode not in (0, EXIT_PREEMPTED), out.stdout[-3000:] + out.stderr[-3000:]
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000003"
    torn = next((root / "step_00000004").glob("zero_pp_rank_0_*optim_states.pt"))
    whole = next((root / "step_00000003").glob("zero_pp_rank_0_*optim_states.pt"))
    assert 0 < torn.stat().st_size < whole.stat().st_size  # half a file on disk
    assert not ckpt.is_committed(root / "step_00000004") and ckpt.is_committed(root / "step_00000003")
    with open(whole, "r+b") as f:  # the committed step 3 loses the tail of a shard
        f.truncate(whole.stat().st_size // 2)
    assert (root / "step_00000003" / ckpt.COMMIT_MARKER).is_file() and not ckpt.is_committed(root / "step_00000003")
    before = metrics(run)
    again = launch(cfg)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-5000:]
    assert "passing over step_00000004" in text and "passing over step_00000003" in text
    assert "`latest` names step_00000003 but the newest intact checkpoint is step_00000002" in text
    assert_resumed(text, run, 2, before)
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert losses(run)[6] == losses(reference)[6]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]  # the steps redone after the crash are logged once


def test_a_dead_rank_ends_the_run_without_hanging(tmp_path, assets, shapes):
    """Rank 1 exits with code 13 after step 2: the run fails, and torchrun's report names that rank and that code.
    (Which failure torchrun calls the root cause is a race: rank 0 fails within the same second, on the broken
    connection to the dead rank, so the report's entries are read, not its order.)"""
    cfg = write_config(tmp_path / "c.yaml", assets, shapes)
    out = launch(cfg, env=fault_env({"die": {"rank": 1, "step": 2}}), timeout=180)
    text = out.stdout + out.stderr
    assert out.returncode not in (0, 2, EXIT_PREEMPTED), text[-3000:]
    failures = logged_rank_failures(text)
    assert failures.get(1) == 13, text[-3000:]  # the dead rank, with the code it died with
    assert all(code != 13 for rank, code in failures.items() if rank != 1), failures


def logged_rank_failures(text: str) -> dict[int, int]:
    """{rank: exit code} of every failure torchrun reports (its "Failures:" and "Root Cause" entries)."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text)
    return {int(rank): int(code) for rank, code in found}


def test_resume_with_a_changed_trained_config_stops_and_names_the_keys(reference):
    """The reference run resumed with other Adam betas and data: exit 2 listing both and the key that allows it;
    nothing in the run directory is rewritten. max_steps and logging are not trained keys: not listed."""
    import subprocess
    import sys

    from helpers.runs import ROOT

    before = (reference / "config.yaml").read_text()
    out = subprocess.run([sys.executable, "-m", "pretrain", "train", str(reference / "config.yaml"),
                          "train.betas=[0.9,0.95]", "data.max_length=100", "train.max_steps=9", "train.log_every=3"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "train.betas" in text and "data.max_length: 64 -> 100" in text
    assert "checkpoint.allow_config_change=true" in text
    assert "max_steps" not in text and "log_every" not in text
    assert (reference / "config.yaml").read_text() == before and not list(reference.glob("config.*.yaml"))
