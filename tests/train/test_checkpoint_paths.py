"""Every way a user names a checkpoint (`latest`, a tag, a run directory, its checkpoints/ folder) resolves to the
same committed tag; what is not one is an error that says what was given."""

from __future__ import annotations

import os

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


def _committed_with_crcs(root, step):
    """A checkpoint as the trainer commits it with checkpoint.verify=crc: each rank's reported files summed."""
    tag = ckpt.tag_for(step)
    (root / tag).mkdir(parents=True)
    for name in ("zero_pp_rank_0_optim_states.pt", "zero_pp_rank_1_optim_states.pt"):
        (root / tag / name).write_bytes(bytes(range(256)) * 40 + bytes([step]))
    reports = [{"zero_pp_rank_0_optim_states.pt": 10241}, {"zero_pp_rank_1_optim_states.pt": 10241}]
    crcs = {n: c for r in reports for n, c in ckpt.checksums(root / tag, r).items()}
    (root / tag / "config.yaml").write_text("rank 0's own file, summed at the commit\n")
    ckpt.commit(root, tag, {"step": step}, reports, crcs)
    return root / tag


def test_a_flipped_bit_passes_the_checkpoint_over_for_the_previous_one_under_crc(tmp_path, caplog):
    """checkpoint.verify=crc: COMMITTED holds a CRC-32 of every file it lists (the ranks' and rank 0's own). One bit
    flipped in a shard of the newest checkpoint (its size unchanged): `sizes` still takes it, `crc` passes it over
    with a warning that names the file, and takes the previous committed checkpoint, naming it; an explicit path
    to it is refused with the file named."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    older = _committed_with_crcs(root, 2)
    newest = _committed_with_crcs(root, 4)
    listed = ckpt.read_meta(newest)
    assert set(listed["crc32"]) == set(listed["files"]) == {"zero_pp_rank_0_optim_states.pt",
                                                            "zero_pp_rank_1_optim_states.pt", "config.yaml"}
    assert ckpt.resolve_checkpoint("auto", run, verify="crc") == newest  # intact: taken
    shard = newest / "zero_pp_rank_1_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x10
    shard.write_bytes(bytes(data))
    assert ckpt.resolve_checkpoint("auto", run, verify="sizes") == newest  # what a sizes-only check misses
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_checkpoint("auto", run, verify="crc") == older
    text = caplog.text
    assert "passing over step_00000004: zero_pp_rank_1_optim_states.pt fails its CRC-32 check" in text
    assert "using step_00000002, the newest committed checkpoint before step_00000004" in text
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_1_optim_states.pt fails its CRC-32 check"):
        ckpt.resolve_checkpoint(newest, run, verify="crc")


def test_a_failed_commit_marker_write_leaves_latest_on_the_previous_checkpoint(tmp_path):
    """The COMMITTED write of step 4 fails for real (a directory stands where its temporary file goes, so the
    open fails with IsADirectoryError): the commit raises, and `latest` still names step 2, the newest committed
    checkpoint, which a resume takes."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    _committed(root, 2)
    tag = ckpt.tag_for(4)
    (root / tag).mkdir()
    (root / tag / "shard.pt").write_bytes(b"y" * 10)
    (root / tag / f"{ckpt.COMMIT_MARKER}.tmp{os.getpid()}").mkdir()
    with pytest.raises(OSError):
        ckpt.commit(root, tag, {"step": 4})
    assert (root / ckpt.LATEST).read_text().strip() == ckpt.tag_for(2)
    assert not (root / tag / ckpt.COMMIT_MARKER).exists()
    assert ckpt.resolve_checkpoint("auto", run) == root / ckpt.tag_for(2)
