"""The restart policy shared by `pretrain launch --max-restarts` and the sbatch template (pretrain.launch.restarts)."""

from __future__ import annotations

import json

from pretrain.exit_codes import EXIT_CONFIG, EXIT_STALLED
from pretrain.launch.restarts import decide, main, newest_step


def test_a_new_checkpoint_restarts_one_failure_without_is_retried_the_second_stops():
    crash = decide(137, started=None, newest=3, failures_in_a_row=0, restarts=0, max_restarts=5)
    assert crash.restart and crash.failures_in_a_row == 0 and "a newer checkpoint was committed" in crash.message
    again = decide(EXIT_STALLED, started=3, newest=3, failures_in_a_row=0, restarts=1, max_restarts=5)
    assert again.restart and again.failures_in_a_row == 1 and "one more try" in again.message
    stop = decide(1, started=3, newest=3, failures_in_a_row=1, restarts=2, max_restarts=5)
    assert not stop.restart and "2 times in a row without a new checkpoint (newest: step 3): giving up" in stop.message
    progressed = decide(1, started=3, newest=6, failures_in_a_row=1, restarts=2, max_restarts=5)
    assert progressed.restart and progressed.failures_in_a_row == 0
    never = decide(1, started=None, newest=None, failures_in_a_row=1, restarts=1, max_restarts=5)
    assert not never.restart and "newest: the start (no checkpoint yet)" in never.message
    assert not decide(EXIT_CONFIG, None, 9, 0, 0, 5).restart  # the same command fails the same way
    capped = decide(1, started=3, newest=6, failures_in_a_row=0, restarts=5, max_restarts=5)
    assert not capped.restart and "after 5 restart(s), the limit" in capped.message


def test_the_command_line_keeps_the_count_between_requeues(tmp_path, capsys):
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "COMMITTED").write_text(json.dumps({"files": {}}))
    assert newest_step(run) == 4
    state = tmp_path / "restarts.json"
    argv = ["after", str(run), "--code", "1", "--started", "4", "--state", str(state), "--max-restarts", "9"]
    assert main(argv) == 0 and json.loads(state.read_text()) == {"failures_in_a_row": 1}
    (run / "STALLED").write_text(json.dumps({"message": "m", "blamed": [{"host": "n2"}, {"host": "n1"}]}))
    assert main(argv) == 3
    assert "exclude: n1,n2" in capsys.readouterr().out
