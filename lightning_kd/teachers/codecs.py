"""Wire formats of :class:`~lightning_kd.teachers.remote.RemoteTeacher`: how a batch of inputs becomes a request
body and a response body becomes logits (``"json"``, ``"npy"``, or a :class:`Codec` subclass for any other API)."""

from __future__ import annotations

import io
import json
import math
import re
from abc import ABC, abstractmethod

import numpy as np
import torch


class Codec(ABC):
    """How a batch travels: ``encode(inputs) -> (body, content_type)`` and ``decode(body, content_type, n)``.

    ``decode`` may raise any exception on a reply it cannot read; :class:`RemoteTeacher` reports it as a reply
    that does not decode (``processed=True``) and checks the returned tensor is ``(n, C)`` itself.
    """

    @abstractmethod
    def encode(self, inputs: torch.Tensor) -> tuple[bytes, str]:
        """The request body and its content type for a CPU batch ``inputs``."""

    @abstractmethod
    def decode(self, body: bytes, content_type: str, n_samples: int) -> torch.Tensor:
        """The logits in a reply body (``content_type`` as the server sent it, possibly empty)."""


def _numeric(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "fiu":
        raise ValueError(f"logits are not numbers (dtype {array.dtype})")
    return torch.from_numpy(np.array(array, dtype=np.float32))


class JsonCodec(Codec):
    """``{"inputs": rows, "shape": [N, ...]}`` -> ``{"logits": rows}``; float32 values round-trip exactly."""

    def encode(self, inputs: torch.Tensor) -> tuple[bytes, str]:
        x = inputs.to(torch.float32)
        payload = {"inputs": x.reshape(len(x), -1).tolist(), "shape": list(x.shape)}
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode(), "application/json"

    def decode(self, body: bytes, content_type: str, n_samples: int) -> torch.Tensor:
        payload = json.loads(body)
        if not isinstance(payload, dict) or "logits" not in payload:
            raise ValueError('no "logits" member in the reply')
        return _numeric(np.asarray(payload["logits"]))


class NpyCodec(Codec):
    """The float32 input array as a ``.npy`` body, the logits back as one (no pickles either way)."""

    def encode(self, inputs: torch.Tensor) -> tuple[bytes, str]:
        buf = io.BytesIO()
        np.save(buf, inputs.to(torch.float32).numpy(), allow_pickle=False)
        return buf.getvalue(), "application/x-npy"

    def decode(self, body: bytes, content_type: str, n_samples: int) -> torch.Tensor:
        return _numeric(read_npy(body))


_NPY_HEADER = re.compile(
    r"""^\{\s*'descr':\s*'(?P<descr>[^']+)',\s*'fortran_order':\s*(?P<fortran>True|False),"""
    r"""\s*'shape':\s*\((?P<shape>[0-9,\s]*)\),?\s*\}\s*$"""
)


def read_npy(body: bytes) -> np.ndarray:
    """A ``.npy`` body (format versions 1-3, plain numeric dtype) as an array, without ``np.load``.

    ``np.load`` parses the header with ``ast.literal_eval``, and CPython 3.11's AST conversion keeps its recursion
    counter in process-wide state: decoding in the fill's request threads at once fails now and then with
    ``SystemError: AST constructor recursion depth mismatch``. This reads the header np.save writes with a regex.
    """
    magic = b"\x93NUMPY"
    if body[:6] != magic or len(body) < 10:
        raise ValueError("not a .npy body (no \\x93NUMPY magic)")
    major = body[6]
    if major not in (1, 2, 3):
        raise ValueError(f".npy format version {major} is not supported")
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes
    header_len = int.from_bytes(body[8:start], "little")
    header = body[start : start + header_len].decode("utf8" if major == 3 else "latin1")
    match = _NPY_HEADER.match(header)
    if match is None:
        raise ValueError(f"unreadable .npy header {header.strip()!r}")
    dtype = np.dtype(match["descr"])
    shape = tuple(int(d) for d in match["shape"].replace(" ", "").split(",") if d)
    count = math.prod(shape)
    offset = start + header_len
    need = count * dtype.itemsize
    if len(body) - offset != need:
        raise ValueError(f".npy body holds {len(body) - offset} data bytes, shape {shape} needs {need}")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if match["fortran"] == "True" else "C")


CODECS = {"json": JsonCodec, "npy": NpyCodec}
