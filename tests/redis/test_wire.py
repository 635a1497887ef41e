"""The shared store's wire format: blobs (relay_llm.wire), key names, SET NX and stream announcements.

fakeredis stands in for Redis here only, to pin the bytes and keys without a server; everything about
behaviour against a real Redis is in test_shared_store.py.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from relay_llm import wire
from relay_llm.redis_store import RedisSegmentStore

from .conftest import _missing
from .helpers import make_segment, prompt_with

try:
    import fakeredis
except ImportError:  # in the dev extra
    fakeredis = None

FP = "llama:abc123:float32|no-profile"


@pytest.mark.parametrize("hidden", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_round_trip(hidden, dtype):
    seg = make_segment(FP, hidden=hidden, dtype=dtype)
    back = wire.unpack(wire.pack(seg), FP)
    assert torch.equal(back.token_ids, seg.token_ids) and back.token_ids.dtype == torch.long
    assert torch.equal(back.keys, seg.keys) and torch.equal(back.values, seg.values) and back.keys.dtype == dtype
    assert (back.hidden is None) == (not hidden) and (not hidden or torch.equal(back.hidden, seg.hidden))
    assert (back.start_pos, back.kind, back.fingerprint, back.hidden_layer) == (5, "decode", FP, 1)


def test_header_fields():
    blob = wire.pack(make_segment(FP, n=20))
    magic, version, crc = struct.unpack_from("<3sBI", blob)
    assert magic == b"RLS" and version == wire.FORMAT_VERSION == 1
    body = blob[8:]
    (n_header,) = struct.unpack_from("<Q", body)
    import json

    meta = json.loads(body[8 : 8 + n_header])["__metadata__"]
    assert meta == {"fingerprint": FP, "kind": "decode", "start_pos": "5", "hidden_layer": "1", "format_version": "1",
                    "tokens": "20"}


def _flip(blob: bytes, at: int) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x40
    return bytes(b)


@pytest.mark.parametrize("damage", ["none", "empty", "short", "truncated", "flipped_data", "flipped_header",
                                    "magic", "version", "fingerprint"])
def test_unusable_blobs_raise_badblob(damage):
    good = wire.pack(make_segment(FP))
    blob = {"none": None, "empty": b"", "short": good[:5], "truncated": good[: len(good) // 2],
            "flipped_data": _flip(good, len(good) - 10), "flipped_header": _flip(good, 30),
            "magic": b"XXX" + good[3:], "version": good[:3] + bytes([9]) + good[4:],
            "fingerprint": wire.pack(make_segment("other-model:1:float32|no-profile"))}[damage]
    with pytest.raises(wire.BadBlob):
        wire.unpack(blob, FP)


@pytest.fixture(autouse=True)
def _fakeredis() -> None:
    if fakeredis is None:
        _missing("fakeredis is not installed (pip install -e '.[all]')")


def _store(client, fp=FP) -> RedisSegmentStore:
    store = RedisSegmentStore("redis://fake", min_match_tokens=8, client=client)
    store.fingerprint = fp  # as connect() sets it, without the background threads
    return store


def test_keys_are_namespaced_by_fingerprint_and_written_once():
    client = fakeredis.FakeRedis()
    a = _store(client)
    seg = make_segment(FP)
    ns = "relay:" + hashlib.sha256(FP.encode()).hexdigest()[:16]
    assert a.blob_key(seg.content_key) == f"{ns}:seg:{seg.content_key}" and a.stream_key == f"{ns}:new"
    assert _store(client, "other:1:bfloat16|no-profile").blob_key(seg.content_key) != a.blob_key(seg.content_key)
    assert a.publish(seg) is True
    assert torch.equal(wire.unpack(client.get(a.blob_key(seg.content_key)), FP).keys, seg.keys)
    assert a.publish(seg) is False  # SET NX: already there, not announced again
    entries = client.xrange(a.stream_key)
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields[b"key"].decode() == seg.content_key and fields[b"origin"].decode() == a.replica
    assert torch.equal(torch.frombuffer(bytearray(fields[b"ids"]), dtype=torch.int32).long(), seg.token_ids)
    assert (fields[b"start"], fields[b"kind"], fields[b"layer"]) == (b"5", b"decode", b"1")


def test_announcement_makes_a_stub_that_fetches_its_blob_on_match():
    client = fakeredis.FakeRedis()
    a, b = _store(client), _store(client)
    seg = make_segment(FP, n=24)
    a.publish(seg)
    (_, fields), = client.xrange(a.stream_key)
    a._announced(fields)  # its own announcement: ignored
    assert len(a) == 0
    b._announced(fields)
    b._announced(fields)  # twice: still one entry
    assert len(b) == 1 and next(iter(b)).keys is None and b.shared.announced == 1
    b._online.set()
    (m,) = b.find(prompt_with(seg), fingerprint=FP)
    assert (m.start, m.offset, m.length) == (7, 0, 24) and b.shared.fetched == 1
    assert torch.equal(m.segment.keys, seg.keys) and torch.equal(m.segment.hidden, seg.hidden)


def test_announcement_whose_ids_do_not_match_its_key_is_ignored():
    client = fakeredis.FakeRedis()
    a, b = _store(client), _store(client)
    a.publish(make_segment(FP))
    (_, fields), = client.xrange(a.stream_key)
    b._announced({**fields, b"ids": fields[b"ids"][:-4]})
    assert len(b) == 0


def test_context_sketch_round_trip():
    """The sketch of what preceded a segment travels with it (uint64 hashes through int64 bit patterns), so a
    replica decides relay's detection as the writer would; a segment without one comes back without one."""
    import numpy as np

    from relay_llm.matcher import context_sketch

    seg = make_segment(FP)
    seg.context = context_sketch(list(range(100, 200)))
    assert (seg.context > np.uint64(1 << 63)).any()  # high bits set: the int64 view must not lose them
    back = wire.unpack(wire.pack(seg), FP)
    assert back.context.dtype == np.uint64 and np.array_equal(back.context, seg.context)
    assert wire.unpack(wire.pack(make_segment(FP)), FP).context is None
