"""Disk offloading: one safetensors file per group, named by a hash of its content, mapped with mmap.

The file's data section is exactly the group's flat layout (tensors at aligned offsets; the gaps
are filled by `__pad_<n>` uint8 entries so the file stays a valid safetensors file that any
reader loads), so one copy moves a whole group. The header is padded with spaces so the data
section starts at an aligned file offset.

- Name: the SHA-256 of header and data. Changed weights get another name, so a stale file is never
  reused; old files stay as a cache and can be deleted at will.
- Write: to a temporary file in the same folder, then `os.replace` (atomic on POSIX and Windows),
  so a reader never sees a half-written file under a final name. There is no fsync: a file torn
  by a power loss is caught by the verification below, which every reuse goes through.
- Reuse: an existing file is mapped and compared with the expected header and with the weights
  byte for byte; a truncated, corrupt or foreign file is rewritten, never loaded.
- Read: the file is mapped copy-on-write; a group's tensors are views into the mapping, so reading
  them outside a forward still gives the right values. Loads read the file with `preadv` straight
  into the destination (a device slot on the CPU, a pinned staging buffer on CUDA): one system call
  per group or chunk, no page faults, no pages kept in this process; the OS page cache serves
  repeated reads. Once a write-back changed mapped (copy-on-write) pages, loads copy from the
  mapping instead, and its pages are never dropped.
- Writes that bypass version counters (`weight.data.add_(1)`, `EMAModel.copy_to`) change mapped
  pages too: before pages are dropped, the page table (`/proc/self/pagemap`) says whether any of
  them became a private copy; if so (or where that cannot be known) the file counts as written and
  its pages are kept, so the write is never dropped. The file itself is never changed.
- Checks: the file must not change under a running model. Every use checks its size and mtime
  (`check`, one `fstat`, before the mapping is touched: a truncated mapping would kill the process
  with SIGBUS); where the weights become the model's again (`remove`) its content is hashed and
  compared with its name (`verify`). A changed file raises `OffloadFileError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CompatibilityError, ConfigError, OffloadFileError
from ._groups import ALIGN, Group

logger = logging.getLogger("hookwise.memory.disk")

FORMAT = "hookwise.offload/1"
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("complex64", "C64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def default_dir() -> Path:
    """Where disk offloading writes when no `disk_path` is given: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hookwise" / "offload"


_FILE_NAME = re.compile(r"^[0-9a-f]{32}\.safetensors(\.tmp-\d+-[0-9a-f]{8})?$")


def offload_cache_files(directory: str | Path | None = None) -> list[Path]:
    """The group files disk offloading wrote in `directory` (default: `default_dir()`), oldest first.

    Only files named as `store` names them (content hash, or a temporary of one) are listed, so a
    folder shared with other files is safe to clean.
    """
    folder = Path(directory).expanduser() if directory is not None else default_dir()
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and _FILE_NAME.match(p.name)]
    return sorted(files, key=lambda p: p.stat().st_mtime)


def clean_offload_cache(directory: str | Path | None = None, *, dry_run: bool = False) -> tuple[int, int]:
    """Delete the group files of `offload_cache_files(directory)`; returns (files, bytes) removed.

    Meant for when no process offloads from the folder; the next disk offload writes what it needs again.
    """
    count = size = 0
    for path in offload_cache_files(directory):
        nbytes = path.stat().st_size
        if not dry_run:
            path.unlink(missing_ok=True)
        count, size = count + 1, size + nbytes
    return count, size


def check_writable(directory: Path) -> Path:
    """Create `directory` if needed and prove it is writable, or raise `ConfigError`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".hookwise-probe-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"disk_path {str(directory)!r} is not writable ({exc.strerror or exc}); pass a folder you can write "
            f"to, on a disk with room for the offloaded weights"
        ) from exc
    return directory.resolve()


def header_for(group: Group) -> bytes:
    """The safetensors header of `group`'s file, padded so the data section starts aligned."""
    entries: dict[str, object] = {}
    pos = 0
    pads = 0
    for ref in group.tensors:
        if ref.offset > pos:
            entries[f"__pad_{pads}"] = {"dtype": "U8", "shape": [ref.offset - pos], "data_offsets": [pos, ref.offset]}
            pads += 1
        dtype = ref.dtype
        if dtype not in _DTYPES:
            raise ConfigError(f"{ref.path}: dtype {dtype} cannot be written to a safetensors file for disk offloading")
        end = ref.offset + ref.nbytes
        entries[ref.path] = {"dtype": _DTYPES[dtype], "shape": list(ref.shape), "data_offsets": [ref.offset, end]}
        pos = end
    if group.nbytes > pos:
        entries[f"__pad_{pads}"] = {"dtype": "U8", "shape": [group.nbytes - pos], "data_offsets": [pos, group.nbytes]}
    entries["__metadata__"] = {"format": "pt", "writer": FORMAT, "group": group.name}
    text = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    total = 8 + len(text)
    text += b" " * ((-total) % ALIGN)
    return text


def _changed(path: Path, what: str) -> OffloadFileError:
    return OffloadFileError(
        f"the offload file {path} {what} while the model used it, so its weights can no longer be trusted "
        f"(another process or a cleanup touched the offload folder?). Leave the files of a running model "
        f"alone; load the weights again (a fresh model from its checkpoint) and apply offloading again "
        f"(a corrupt file is detected and rewritten then)"
    )


def _private_pages(address: int, length: int) -> bool | None:
    """Whether any page of this process in [address, address + length) is a private (written) copy
    of a mapped file page, or swapped out; None when the page table cannot be read (not Linux)."""
    if length <= 0:
        return False
    page = mmap.PAGESIZE
    first, last = address // page, (address + length - 1) // page
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(first * 8)
            raw = f.read((last - first + 1) * 8)
    except OSError:
        return None
    if len(raw) != (last - first + 1) * 8:
        return None
    entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)
    present = entries < 0  # bit 63
    swapped = (entries >> 62) & 1
    file_page = (entries >> 61) & 1
    return bool(((present & (file_page == 0)) | (swapped == 1)).any())


@dataclass
class DiskFile:
    """A group's mapped file: `data` is the flat layout (a uint8 view into the mapping)."""

    path: Path
    data: torch.Tensor
    mapping: mmap.mmap
    reused: bool
    data_offset: int = 0  # where the flat layout starts in the file
    dirty: bool = False  # a view was written (copy-on-write pages): read the mapping, never drop it
    fd: int | None = None

    def __post_init__(self) -> None:
        # The descriptor pins the inode this mapping reads; its size and mtime are what `check` compares.
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(self.fd)
        self.stat = (st.st_ino, st.st_size, st.st_mtime_ns)

    def __deepcopy__(self, memo: dict) -> DiskFile:
        raise CompatibilityError(
            f"a model with disk offloading cannot be deep-copied or pickled (its weights are mapped from {self.path}); "
            f"remove offloading first (hookwise.remove(model)), copy or save, then apply it again to each copy"
        )

    def __reduce_ex__(self, protocol: object) -> Any:
        self.__deepcopy__({})

    def check(self) -> None:
        """Raise `OffloadFileError` if the file changed (size, mtime, or another file under its name)."""
        if self.fd is None:
            return
        st = os.fstat(self.fd)
        if st.st_size != self.stat[1]:
            raise _changed(self.path, f"has {st.st_size} bytes instead of {self.stat[1]} (truncated or rewritten)")
        if st.st_mtime_ns != self.stat[2]:
            raise _changed(self.path, "was modified")
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            return  # deleted: the mapping (and `fd`) still hold its bytes
        if inode != self.stat[0]:
            # Replaced under the same name (another process rewrote it): its content is what the name says,
            # and this process still reads the file it mapped.
            logger.debug("hookwise offload: %s was replaced by another file of the same name", self.path)

    def verify(self) -> None:
        """`check`, then hash the file and compare with its name; raise `OffloadFileError` on mismatch."""
        self.check()
        if self.fd is None:
            return
        digest = hashlib.sha256()
        pos, size = 8, self.stat[1]
        while pos < size:
            chunk = os.pread(self.fd, min(2**24, size - pos), pos)
            if not chunk:
                raise _changed(self.path, "ended early")
            digest.update(chunk)
            pos += len(chunk)
        if digest.hexdigest()[:32] != self.path.name.split(".", 1)[0]:
            raise _changed(self.path, "does not hold the bytes its name promises (changed in place)")

    def read_into(self, dst: torch.Tensor, start: int = 0) -> None:
        """Copy bytes [start, start + dst.numel()) of the flat layout into the CPU uint8 tensor `dst`."""
        n = dst.numel()
        self.check()
        if not hasattr(os, "preadv") or self.dirty or n == 0:
            dst.copy_(self.data[start : start + n])
            return
        view = memoryview(dst.numpy()).cast("B")
        done = 0
        while done < n:
            got = os.preadv(self.fd, [view[done:]], self.data_offset + start + done)
            if got <= 0:
                raise _changed(self.path, f"ended early (read {done} of {n} bytes)")
            done += got

    def will_need(self, start: int = 0, length: int = 0) -> None:
        """Ask the OS to start reading the file ahead (asynchronous readahead into the page cache)."""
        if self.fd is not None and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd, self.data_offset + start, length, os.POSIX_FADV_WILLNEED)
            except OSError:  # pragma: no cover - a filesystem without it
                pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def written(self) -> bool:
        """Whether the mapping holds writes (known ones, or private copies of pages in the page table)."""
        if not self.dirty:
            private = _private_pages(self.data.data_ptr(), self.data.numel())
            if private is None or private:
                # Written through an alias no version counter sees (`.data`): keep those pages.
                self.dirty = True
        return self.dirty

    def drop_pages(self) -> None:
        """Release this process's mapped pages (they stay in the OS page cache), unless written."""
        if not hasattr(self.mapping, "madvise") or self.written():
            return
        try:
            self.mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # pragma: no cover - platform without it
            pass


def _map(path: Path) -> tuple[mmap.mmap, torch.Tensor]:
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return mapping, torch.frombuffer(mapping, dtype=torch.uint8)


def _close(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # a tensor still views it; it is freed with the last view
        pass


def _verify(path: Path, header: bytes, flat: torch.Tensor) -> tuple[mmap.mmap, torch.Tensor] | None:
    """The mapping of `path` if it holds exactly `header` + `flat`, else None (with the reason logged)."""
    expected = 8 + len(header) + flat.numel()
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if size != expected:
        logger.warning("hookwise offload: %s has %d bytes, expected %d (truncated or foreign): rewriting", path, size, expected)
        return None
    mapping, raw = _map(path)
    head = bytes(mapping[: 8 + len(header)])
    if struct.unpack("<Q", head[:8])[0] != len(header) or head[8:] != header:
        logger.warning("hookwise offload: %s has an unexpected header: rewriting", path)
        del raw
        _close(mapping)
        return None
    data = raw[8 + len(header) :]
    if not torch.equal(data, flat):
        logger.warning("hookwise offload: %s does not hold the weights its name promises (corrupt): rewriting", path)
        del data, raw
        _close(mapping)
        return None
    return mapping, raw


def store(directory: Path, group: Group, flat: torch.Tensor) -> DiskFile:
    """Write (or verify and reuse) the file of `group`, whose flat layout is `flat`; map it."""
    header = header_for(group)
    digest = hashlib.sha256(header)
    digest.update(memoryview(flat.numpy()))
    path = directory / f"{digest.hexdigest()[:32]}.safetensors"
    found = _verify(path, header, flat) if path.exists() else None
    reused = found is not None
    if found is None:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(header)))
                f.write(header)
                f.write(memoryview(flat.numpy()))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"could not write the offload file {path} ({exc}); check free space in {directory}") from exc
        found = _map(path)
    mapping, raw = found
    data = raw[8 + len(header) : 8 + len(header) + group.nbytes]
    return DiskFile(path, data, mapping, reused, data_offset=8 + len(header))
