"""Write a .safetensors file one tensor (and one piece of a tensor) at a time.

The safetensors library writes a file from a dict of complete tensors, so a shard written through it is held in
memory whole. The format itself streams well: an 8-byte little-endian header length, a JSON header giving every
tensor's dtype, shape and byte range, then the raw bytes in that order. When every shape is known up front (it is,
from the checkpoint's metadata), the header is written first and the data appended as it is produced, so memory is
bounded by the piece being written, not the shard. Files are read back by `safetensors.safe_open` in the tests.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from pretrain.atomic_file import AtomicFile

# The dtype codes of the safetensors format.
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
HEADER_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned, as safetensors does


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class StreamingSafetensorsWriter:
    """`with StreamingSafetensorsWriter(path, specs) as w: w.write_tensor(name, pieces)`, in `specs` order.

    Pieces are flat (or any shape) tensors of the spec's dtype whose elements, in order, make up the tensor.
    The file appears under its final name only when complete (pretrain.atomic_file)."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this writer copies memory as is")
        self.path = Path(path)
        self.specs = list(specs)
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for spec in self.specs:
            if spec.dtype not in DTYPE_CODES:
                raise TypeError(f"{spec.name}: dtype {spec.dtype} has no safetensors code")
            header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % HEADER_ALIGN)
        self._out = AtomicFile(self.path, durable=True)
        self._file = self._out.file
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0  # index into specs of the next tensor to write

    def write_tensor(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        if self._next >= len(self.specs) or self.specs[self._next].name != name:
            expected = self.specs[self._next].name if self._next < len(self.specs) else "nothing"
            raise ValueError(f"{self.path.name}: got {name}, expected {expected} (tensors go in header order)")
        spec = self.specs[self._next]
        written = 0
        for piece in pieces:
            if piece.dtype != spec.dtype:
                raise TypeError(f"{name}: piece of dtype {piece.dtype}, expected {spec.dtype}")
            data = piece.detach().contiguous().reshape(-1).view(torch.uint8)
            written += data.numel()
            if written > spec.nbytes:
                raise ValueError(f"{name}: more data than its shape {spec.shape} holds")
            self._file.write(data.numpy().data)
        if written != spec.nbytes:
            raise ValueError(f"{name}: {written} bytes written, its shape {spec.shape} needs {spec.nbytes}")
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        if self._next != len(self.specs):
            self.abort()
            missing = [s.name for s in self.specs[self._next:]]
            raise ValueError(f"{self.path.name}: {len(missing)} tensors never written: {missing[:3]}")
        self._out.commit()

    def abort(self) -> None:
        self._out.discard()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
