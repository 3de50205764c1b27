"""The communication layer (pretrain.distributed): the only caller of torch.distributed, tensors placed on the
process group's device (CUDA under NCCL), collectives at world size 1 too."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import ROOT

from pretrain.distributed import placement

LAYER = Path("pretrain/distributed.py")
COMM_MODULES = ("torch.distributed", "deepspeed.comm")


def _comm_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every import of a communication module and every attribute path through one."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith(COMM_MODULES)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            full = [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.lineno, f) for f in full if f.startswith(COMM_MODULES)]
        elif isinstance(node, ast.Attribute):
            parts, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and ".".join([inner.id, *reversed(parts)]) in COMM_MODULES:
                out.append((node.lineno, ".".join([inner.id, *reversed(parts)])))
    return out


def test_no_module_outside_the_layer_touches_torch_distributed():
    offenders = []
    for top in ("pretrain", "launch"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel == LAYER:
                continue
            offenders += [f"{rel}:{line} {what}" for line, what in _comm_uses(ast.parse(path.read_text()))]
    assert not offenders, f"collectives outside {LAYER}:\n" + "\n".join(offenders)
    # The scan itself sees what it must: the layer is found by it.
    assert _comm_uses(ast.parse((ROOT / LAYER).read_text()))
    assert _comm_uses(ast.parse("import torch\ntorch.distributed.all_reduce(x)\n"))


def test_placement_for_nccl_gloo_and_mixed_backends():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert placement({"cuda"}, cpu).type == "cuda"  # NCCL: a CPU tensor must travel to the GPU
    assert placement({"cuda"}, gpu) == gpu
    assert placement({"cpu", "cuda"}, cpu) == cpu  # gloo serves both: no copy
    assert placement({"cpu", "cuda"}, gpu) == gpu  # "cpu:gloo,cuda:nccl": each stays where it is
    assert placement({"cpu"}, gpu) == cpu  # a CPU-only group: the GPU tensor comes to the host


_GROUPS = r"""
import json, torch, torch.distributed as tdist
from torch.utils._python_dispatch import TorchDispatchMode
from pretrain import distributed

class Seen(TorchDispatchMode):
    ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))

tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
out = {}
nccl_like = tdist.new_group([0], backend="cuda:gloo")
try:
    tdist.all_reduce(torch.ones(1), group=nccl_like)
    out["plain_call"] = "ok"
except RuntimeError as err:
    out["plain_call"] = str(err)
out["nccl_like"] = str(distributed.comm_device(torch.device("cpu"), nccl_like))
mixed = tdist.new_group([0], backend="cpu:gloo,cuda:gloo")
out["mixed"] = str(distributed.comm_device(torch.device("cpu"), mixed))
out["mixed_sum"] = distributed.all_reduce(torch.tensor([2.0, 3.0]), group=mixed).tolist()
out["gathered"] = [t.tolist() for t in distributed.all_gather(torch.tensor([4, 5]), group=mixed)]
feats = torch.tensor([1.0, 2.0], requires_grad=True)
rows = distributed.all_gather_with_grad(feats, group=mixed)
(3 * rows[0]).sum().backward()
out["gathered_grad"] = [[t.tolist() for t in rows], feats.grad.tolist()]
out["rank_world"] = list(distributed.rank_and_world())
with Seen():
    out["values"] = distributed.all_reduce_values([torch.tensor(1.5), 2, 3.0])
    out["object"] = distributed.broadcast_object({"tag": "step_00000004"})
    out["objects"] = distributed.all_gather_object(7)
    distributed.all_gather_with_grad(torch.ones(2))
    distributed.barrier()
out["ops"] = Seen.ops
print("RESULT " + json.dumps(out))
tdist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_cuda_only_group_refuses_cpu_tensors_and_the_layer_runs_at_world_size_one():
    """A group created as "cuda:gloo" behaves as NCCL does for a CPU tensor; the layer's device choice for it is
    CUDA, for a mixed group the caller's CPU. At world size 1 the layer still issues every collective."""
    proc = subprocess.run([sys.executable, "-c", _GROUPS], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert "No backend type associated with device type cpu" in out["plain_call"]
    assert out["nccl_like"].startswith("cuda") and out["mixed"] == "cpu"
    assert out["mixed_sum"] == [2.0, 3.0] and out["values"] == [1.5, 2.0, 3.0]
    assert out["object"] == {"tag": "step_00000004"} and out["objects"] == [7]
    assert out["gathered"] == [[4, 5]] and out["rank_world"] == [0, 1]
    assert out["gathered_grad"] == [[[1.0, 2.0]], [3.0, 3.0]]  # the gather is in the graph: the gradient comes home
    for op in ("c10d::allreduce_", "c10d::broadcast_", "c10d::allgather_", "c10d::barrier"):
        assert op in out["ops"], (op, out["ops"])
