"""Every way a user names a checkpoint (`latest`, a tag, a run directory, its checkpoints/ folder) resolves to the
same committed tag; what is not one is an error that says what was given."""

from __future__ import annotations

import pytest

from pretrain.train import checkpoint as ckpt


def _committed(root, step):
    tag = ckpt.tag_for(step)
    (root / tag).mkdir(parents=True)
    (root / tag / "shard.pt").write_bytes(b"x" * 10)
    ckpt.commit(root, tag, {"step": step})
    return root / tag


def test_latest_tag_run_dir_and_checkpoints_folder_name_the_same_checkpoint(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    _committed(root, 2)
    newest = _committed(root, 4)
    (root / ckpt.tag_for(6)).mkdir()  # a save that never committed: passed over
    for given in (root / "latest", newest, run, root, str(run), "auto"):
        assert ckpt.resolve_checkpoint(given, run) == newest, given
    assert ckpt.resolve_checkpoint(root / ckpt.tag_for(2), run) == root / ckpt.tag_for(2)
    assert ckpt.resolve_checkpoint("none", run) is None
    assert ckpt.resolve_checkpoint("auto", tmp_path / "fresh") is None  # nothing to resume yet
    assert ckpt.resolve_resume(str(run), root) == ckpt.resolve_resume("auto", root) == newest


def test_what_is_not_a_checkpoint_is_named(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    _committed(root, 2)
    with pytest.raises(FileNotFoundError, match="nope: no such checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nope", run)
    (root / ckpt.tag_for(6)).mkdir()
    with pytest.raises(FileNotFoundError, match="not a committed"):
        ckpt.resolve_checkpoint(root / ckpt.tag_for(6), run)
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint in it"):
        ckpt.resolve_checkpoint(empty, run)
    (root / ckpt.tag_for(2) / "shard.pt").write_bytes(b"short")  # truncated after the commit
    with pytest.raises(FileNotFoundError, match="not a committed, intact"):
        ckpt.resolve_checkpoint(root / "latest", run)
