"""The streaming safetensors writer, and a small run of the conversion benchmark (tools/bench_convert.py): its
synthetic-checkpoint generator against DeepSpeed's own save, and `pretrain convert` against zero_to_fp32."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.runs import ROOT
from safetensors import safe_open

from pretrain.export.safetensors_stream import StreamingSafetensorsWriter, TensorSpec

TENSORS = {
    "a.weight": torch.randn(5, 7),
    "b.bf16": torch.randn(3, 4, 2).to(torch.bfloat16),
    "c.ids": torch.arange(11, dtype=torch.int64),
    "d.mask": torch.tensor([True, False, True]),
    "e.scalar": torch.tensor(2.5),
    "f.empty": torch.zeros(0, 4),
}


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()]
    with StreamingSafetensorsWriter(path, specs, {"format": "pt"}) as w:
        for k, v in TENSORS.items():
            flat = v.reshape(-1)
            w.write_tensor(k, (flat[i : i + 4] for i in range(0, max(flat.numel(), 1), 4)))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(TENSORS)
        for k, v in TENSORS.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_writer_refuses_wrong_order_or_size_and_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    specs = [TensorSpec("a", (2, 2), torch.float32), TensorSpec("b", (3,), torch.float32)]
    with pytest.raises(ValueError, match="expected a"), StreamingSafetensorsWriter(path, specs) as w:
        w.write_tensor("b", [torch.zeros(3)])
    with pytest.raises(ValueError, match="needs 16"), StreamingSafetensorsWriter(path, specs) as w:
        w.write_tensor("a", [torch.zeros(3)])
    with pytest.raises(TypeError, match="dtype"), StreamingSafetensorsWriter(path, specs) as w:
        w.write_tensor("a", [torch.zeros(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="never written"), StreamingSafetensorsWriter(path, specs) as w:
        w.write_tensor("a", [torch.zeros(4)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_conversion_benchmark_small(tmp_path):
    out = subprocess.run([sys.executable, "tools/bench_convert.py", "all", str(tmp_path), "--size", "tiny",
                          "--converters", "ours_fp32"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "generator checked against DeepSpeed's own save" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["identical_to_deepspeed"] is True
    assert results["ours_fp32"]["peak_rss_bytes"] > 0
