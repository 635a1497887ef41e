"""A `Segment` as bytes: safetensors tensors plus a header, for persisted files and shared (Redis) stores.

`segment_bytes` / `segment_from_bytes` are the safetensors codec both use: tensors token_ids, keys, values
(and hidden, if captured; context, the sketch of what preceded it, as int64 bit patterns); the safetensors
JSON header's metadata holds the segment's fingerprint, kind, start position and capture layer. `pack` /
`unpack` make one self-checking blob of it, the value of one key in a shared store:

    b"RLS" + FORMAT_VERSION (1 byte) + CRC-32 of the rest (4 bytes, little-endian) + safetensors bytes

with metadata format_version and tokens added. `unpack` raises `BadBlob` for a truncated or corrupt blob
(size, magic, CRC, safetensors parse, shapes), another format version, or a fingerprint other than the one
expected: such a blob is never spliced.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import torch
from safetensors.torch import load, save

from .store import Segment

FORMAT_VERSION = 1
MAGIC = b"RLS"
_PREFIX = struct.Struct("<3sBI")  # magic, format version, CRC-32 of the safetensors bytes


class BadBlob(ValueError):
    """A blob that must not be used: truncated, corrupt, another format version or another fingerprint."""


def segment_bytes(seg: Segment, **extra: str) -> bytes:
    """safetensors bytes of `seg`'s tensors; metadata: fingerprint, kind, start_pos, hidden_layer, `extra`."""
    meta = {"fingerprint": seg.fingerprint, "kind": seg.kind, "start_pos": str(seg.start_pos),
            "hidden_layer": str(seg.hidden_layer), **extra}
    tensors = {name: t.detach().contiguous().cpu() for name, t in seg.tensors().items()}
    if seg.context is not None:
        tensors["context"] = torch.from_numpy(np.ascontiguousarray(seg.context).view(np.int64).copy())
    return save(tensors, metadata=meta)


def segment_from_bytes(body: bytes | bytearray | memoryview) -> tuple[Segment, dict[str, str]]:
    """(Segment, metadata) from `segment_bytes` output. ValueError if it cannot be parsed or is inconsistent."""
    body = bytes(body)
    try:
        tensors = load(body)
        (n_header,) = struct.unpack_from("<Q", body)
        meta = json.loads(body[8 : 8 + n_header]).get("__metadata__") or {}
        ids, keys, values = tensors["token_ids"], tensors["keys"], tensors["values"]
        seg = Segment(token_ids=ids.to(torch.long), keys=keys, values=values, start_pos=int(meta["start_pos"]),
                      fingerprint=meta["fingerprint"], kind=meta["kind"], hidden=tensors.get("hidden"),
                      hidden_layer=int(meta["hidden_layer"]))
        if (context := tensors.get("context")) is not None:
            seg.context = context.numpy().view(np.uint64)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"unreadable segment ({type(exc).__name__}: {exc})") from exc
    n = len(seg)
    if ids.dim() != 1 or keys.dim() != 4 or keys.shape != values.shape or keys.shape[2] != n or (
            seg.hidden is not None and seg.hidden.shape[0] != n):
        raise ValueError("segment has inconsistent shapes")
    return seg, meta


def pack(seg: Segment) -> bytes:
    """One blob holding `seg` (see the module docstring)."""
    body = segment_bytes(seg, format_version=str(FORMAT_VERSION), tokens=str(len(seg)))
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body


def unpack(blob: bytes | None, fingerprint: str) -> Segment:
    """The Segment in `blob`, made with `fingerprint`; `BadBlob` otherwise (see the module docstring)."""
    if blob is None:
        raise BadBlob("no blob")
    if len(blob) < _PREFIX.size:
        raise BadBlob(f"truncated blob ({len(blob)} bytes)")
    magic, version, crc = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise BadBlob("not a relay-llm segment blob")
    if version != FORMAT_VERSION:
        raise BadBlob(f"blob format version {version}, this relay-llm reads {FORMAT_VERSION}")
    body = memoryview(blob)[_PREFIX.size :]
    if zlib.crc32(body) != crc:
        raise BadBlob("blob fails its CRC-32 check (truncated or corrupt)")
    try:
        seg, meta = segment_from_bytes(body)
    except ValueError as exc:
        raise BadBlob(str(exc)) from exc
    if seg.fingerprint != fingerprint:
        raise BadBlob(f"blob was made with {seg.fingerprint}, not {fingerprint}")
    if meta.get("tokens") != str(len(seg)):
        raise BadBlob("blob's header and tensors disagree on its length")
    return seg
