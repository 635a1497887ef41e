"""Opt-in persistence of a `SegmentStore`: one safetensors file per segment plus a small JSON index.

Layout of the folder (one folder per model; the engine uses `persist_dir/<model key hash>/`):

    index.json              {"version": 1, "entries": {key: {fingerprint, kind, tokens, start_pos,
                             hidden_layer, hits, reused_tokens, file_bytes, crc32, seq}}}
    <key>.safetensors       tensors token_ids, keys, values[, hidden]; metadata = fingerprint, kind, ...

key is the segment's content key (hash of fingerprint + token ids). Every file, the index included, is
written to a temporary name in the folder and moved into place with `os.replace`, so a reader never sees a
half-written file. The folder mirrors the in-memory store (a segment evicted there is deleted here), so its
size follows the store's byte budget. Hit counters are saved when a segment is written, not on every hit.

On load, an entry is skipped with a warning (and its file deleted) if its file is missing, truncated or
corrupt (size or CRC-32 differ from the index, or safetensors cannot parse it), if its shapes disagree,
or if its fingerprint is not the engine's. Files not in the index (left by a crash between writing a
segment and the index) are deleted. One process at a time may use a folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from .store import Segment
from .wire import segment_bytes, segment_from_bytes

log = logging.getLogger(__name__)

INDEX = "index.json"
VERSION = 1


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then move tmp_path onto `path` (same folder: atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class SegmentFiles:
    """The files of one persisted store (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, dict] = self._read_index()
        self._seq = max((e.get("seq", 0) for e in self.entries.values()), default=0)

    def _read_index(self) -> dict[str, dict]:
        path = self.folder / INDEX
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError(f"unknown index version {data.get('version')!r}")
            return data["entries"]
        except (OSError, ValueError) as exc:
            log.warning("relay-llm: ignoring unreadable segment index %s (%s)", path, exc)
            return {}

    def _write_index(self) -> None:
        data = json.dumps({"version": VERSION, "entries": self.entries}, indent=0, sort_keys=True)
        _atomic_write(self.folder / INDEX, lambda tmp: Path(tmp).write_text(data))

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def write(self, seg: Segment, key: str) -> None:
        """Write `seg`'s file (atomically) and record it; the index is written by `commit`."""
        blob = segment_bytes(seg)
        path = self.path(key)
        _atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))
        self._seq += 1
        self.entries[key] = {"fingerprint": seg.fingerprint, "kind": seg.kind, "tokens": len(seg),
                             "start_pos": seg.start_pos, "hidden_layer": seg.hidden_layer, "hits": seg.hits,
                             "reused_tokens": seg.reused_tokens, "file_bytes": len(blob),
                             "crc32": zlib.crc32(blob), "seq": self._seq}

    def commit(self, removed: list[str] = ()) -> None:
        """Delete the files of `removed` keys, then write the index."""
        for key in removed:
            self.entries.pop(key, None)
            self.path(key).unlink(missing_ok=True)
        self._write_index()

    def clear(self) -> None:
        for key in list(self.entries):
            self.path(key).unlink(missing_ok=True)
        self.entries.clear()
        self._write_index()

    def disk_bytes(self) -> int:
        """Bytes of every file in the folder."""
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    def load(self, fingerprint: str) -> Iterator[tuple[str, Segment]]:
        """(key, Segment) of every readable entry made with `fingerprint`, oldest first.

        Everything else is dropped from the index and deleted, with a warning.
        """
        bad: list[str] = []
        for key, entry in sorted(self.entries.items(), key=lambda kv: kv[1].get("seq", 0)):
            if entry.get("fingerprint") != fingerprint:
                log.warning("relay-llm: persisted segment %s was made with another model, dtype or profile "
                            "(%s, not %s): not loaded", key, entry.get("fingerprint"), fingerprint)
                bad.append(key)
                continue
            try:
                seg = self._read(key, entry)
            except Exception as exc:  # truncated / corrupt / inconsistent: never load it
                log.warning("relay-llm: skipping persisted segment %s: %s", key, exc)
                bad.append(key)
                continue
            yield key, seg
        known = {self.path(k).name for k in self.entries} | {INDEX}
        for p in self.folder.iterdir():
            if p.is_file() and p.name not in known and (p.suffix in (".safetensors", ".tmp")):
                p.unlink(missing_ok=True)  # orphans of an interrupted write
        self.commit(removed=bad)

    def _read(self, key: str, entry: dict) -> Segment:
        path = self.path(key)
        if not path.exists():
            raise FileNotFoundError(f"{path.name} is missing")
        blob = path.read_bytes()
        if len(blob) != entry.get("file_bytes"):
            raise ValueError(f"{path.name} has {len(blob)} bytes, the index says {entry.get('file_bytes')}")
        if zlib.crc32(blob) != entry.get("crc32"):
            raise ValueError(f"{path.name} fails its CRC-32 check")
        seg, _ = segment_from_bytes(blob)
        if len(seg) != entry["tokens"] or seg.fingerprint != entry["fingerprint"]:
            raise ValueError(f"{path.name} disagrees with the index")
        seg.hits, seg.reused_tokens = int(entry.get("hits", 0)), int(entry.get("reused_tokens", 0))
        return seg
