"""Transfer engines: how a group's flat bytes get from the host (or disk) into a device slot.

The scheduler decides *what* moves *when*; an engine only moves bytes and orders them against
compute. Two engines share that interface:

- `SyncEngine` (CPU and any device without streams): synchronous copies on the calling thread,
  made when the group is needed. On the CPU a disk-backed group is not copied at all: its
  parameters stay views of the mapped file, the OS reads it ahead from the moment the group is
  prefetched (`posix_fadvise(WILLNEED)`, called from a helper thread that only waits on the
  disk), and its pages are released after use. Disk latency hides behind compute without a
  thread competing with the compute threads for the CPU.
- `StreamEngine`: a dedicated copy stream. A pinned group moves with one asynchronous copy; a
  pageable or disk-backed group is staged through a small ring of pinned buffers on a worker
  thread (host memcpy of chunk k+1 overlaps the device copy of chunk k). Ordering uses events
  only: a load waits on the event recorded when its slot's previous group was last used; compute
  waits on the load's event. Nothing calls a device-wide synchronize. A staging buffer is reused
  after a host wait on *its own* copy's event.

`StreamEngine` talks to the device through a small backend object (streams, events, pinned
allocation), so its ordering logic runs in CPU tests with a recording fake.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

logger = logging.getLogger("hookwise.memory.transfer")

STAGING_CHUNK = 32 * 2**20  # bytes per pinned staging buffer
STAGING_BUFFERS = 4


@dataclass(eq=False)
class HostSource:
    """Where a streamed group lives between uses: a flat uint8 host tensor in its layout."""

    flat: torch.Tensor
    kind: str  # "pinned" | "pageable" | "disk"
    disk: Any = None  # the group's `DiskFile` when kind == "disk"

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def before_read(self) -> None:
        """Called when a copy out of this source is issued: start reading a file ahead."""
        if self.disk is not None:
            self.disk.will_need()

    def read_into(self, dst: torch.Tensor, start: int = 0) -> None:
        """Copy bytes [start, start + dst.numel()) of this source into the host tensor `dst`."""
        if self.disk is not None:
            self.disk.read_into(dst, start)
        else:
            dst.copy_(self.flat[start : start + dst.numel()])

    def after_read(self) -> None:
        """Called (by the scheduler, on its thread) once a copy out of this source was waited for and
        nothing changed it meanwhile: drop mapped file pages from this process."""
        if self.disk is not None:
            self.disk.drop_pages()

    def mark_written(self) -> None:
        """The host copy was changed (a write-back): mapped pages now differ from the file."""
        if self.disk is not None:
            self.disk.dirty = True


@dataclass
class EngineStats:
    loads: int = 0
    bytes: int = 0
    staged_chunks: int = 0
    writebacks: int = 0
    log: list[tuple] | None = None  # (event, ...) when recording for tests

    def note(self, *entry: Any) -> None:
        if self.log is not None:
            self.log.append(entry)


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering `n` bytes in pieces of at most `size`."""
    return [(s, min(s + size, n)) for s in range(0, n, size)] or [(0, 0)]


class TransferEngine:
    """Base engine: synchronous copies on the calling thread, made when the data is needed.

    `start_load` only notes the copy (and lets a disk source start its readahead); `wait` makes it.
    The copy therefore runs at use time, but the OS has been reading the file into its page cache
    since the prefetch, so disk latency still hides behind the compute in between, and no thread
    competes with the compute threads for the CPU.
    """

    streams = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats = EngineStats()
        self._reader: ThreadPoolExecutor | None = None

    # ---- memory ------------------------------------------------------------------------------
    def alloc_slot(self, nbytes: int) -> torch.Tensor:
        """A device buffer for one group; allocated once and reused."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def alloc_host(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
        """A host buffer (pinned when asked and possible); returns (buffer, pinned)."""
        return torch.empty(nbytes, dtype=torch.uint8), False

    def direct(self, src: HostSource) -> bool:
        """Whether the device computes on `src` in place (no slot, no copy).

        True for a disk-backed group when the device is the CPU: its mapped file is memory the
        CPU reads directly; prefetching is an OS read-ahead and finishing releases the pages.
        """
        return False

    def read_ahead(self, src: HostSource) -> None:
        """Have the OS start reading `src` (a file) into its page cache, without waiting here."""
        if src.disk is None:
            return
        # posix_fadvise(WILLNEED) blocks while it submits the reads of a large range: a helper
        # thread makes the call. It sleeps in the kernel on the disk, so it takes no compute time.
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookwise-offload-readahead")
        self._reader.submit(src.before_read)

    # ---- transfers ---------------------------------------------------------------------------
    def start_load(self, src: HostSource, dst: torch.Tensor, after: Any) -> Any:
        """Begin copying `src` into the start of `dst` once `after` (a marker) has passed; a ticket."""
        self.stats.loads += 1
        self.stats.bytes += src.nbytes
        self.stats.note("load", src.kind, src.nbytes)
        return (src, dst)

    def _copy(self, src: HostSource, dst: torch.Tensor) -> None:
        n = src.nbytes
        if dst.device.type == "cpu":
            src.read_into(dst[:n])
        else:
            dst[:n].copy_(src.flat)
        self.stats.note("copy", n, False)

    def wait(self, ticket: Any) -> None:
        """Make compute wait until the load behind `ticket` is visible (here: make the copy)."""
        if ticket is not None:
            self._copy(*ticket)

    def mark_done(self) -> Any:
        """A marker that passes once the compute queued so far has finished (slot reuse guard)."""
        return None

    def copy_back(self, view: torch.Tensor, master: torch.Tensor) -> None:
        """Copy a device tensor changed in place back into its host master (rare; synchronous)."""
        master.copy_(view)
        self.stats.writebacks += 1
        self.stats.note("writeback", view.numel() * view.element_size())

    def close(self) -> None:
        """Finish outstanding work and release threads."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None


class SyncEngine(TransferEngine):
    """Synchronous copies at use time: the schedule is the same, disk reads run ahead in the OS."""

    def direct(self, src: HostSource) -> bool:
        return self.device.type == "cpu" and src.kind == "disk"


class CudaBackend:
    """The device operations `StreamEngine` needs, on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


@dataclass
class StagingRing:
    """A few pinned host buffers reused in turn; a buffer is reused after its last copy's event."""

    alloc: Callable[[int], torch.Tensor]
    chunk: int = STAGING_CHUNK
    count: int = STAGING_BUFFERS
    buffers: list[torch.Tensor] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    next: int = 0
    host_waits: int = 0

    def acquire(self) -> tuple[int, torch.Tensor]:
        if not self.buffers:
            self.buffers = [self.alloc(self.chunk) for _ in range(self.count)]
            self.events = [None] * self.count
        i = self.next
        self.next = (i + 1) % self.count
        event = self.events[i]
        if event is not None:
            # A host wait for this buffer's own previous copy: the device keeps computing.
            event.synchronize()
            self.host_waits += 1
        return i, self.buffers[i]

    def release(self, index: int, event: Any) -> None:
        self.events[index] = event

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)


class StreamEngine(TransferEngine):
    """Asynchronous copies on a dedicated stream, ordered against compute by events."""

    streams = True

    def __init__(self, device: torch.device, backend: Any | None = None, *, chunk: int = STAGING_CHUNK) -> None:
        super().__init__(device)
        self.backend = backend if backend is not None else CudaBackend(device)
        self.copy_stream = self.backend.new_stream()
        self.ring = StagingRing(self._pinned_staging, chunk)
        self._pool: ThreadPoolExecutor | None = None

    def _pinned_staging(self, nbytes: int) -> torch.Tensor:
        return self.backend.pinned(nbytes)

    def alloc_host(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
        if pin:
            try:
                return self.backend.pinned(nbytes), True
            except RuntimeError as exc:  # the OS refused to lock more memory
                logger.warning("hookwise offload: pinning %d bytes failed (%s); this group is staged instead", nbytes, exc)
        return torch.empty(nbytes, dtype=torch.uint8), False

    def _issue(self, src: torch.Tensor, dst: torch.Tensor, after: Any) -> Any:
        """One asynchronous host->device copy on the copy stream; returns its completion event."""
        backend, stream = self.backend, self.copy_stream
        with backend.use_stream(stream):
            if after is not None:
                stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event = backend.new_event()
            event.record(stream)
        self.stats.note("copy", src.numel(), after is not None)
        return event

    def start_load(self, src: HostSource, dst: torch.Tensor, after: Any) -> Any:
        n = src.nbytes
        self.stats.loads += 1
        self.stats.bytes += n
        if src.kind == "pinned":
            self.stats.note("load", src.kind, n)
            return self._issue(src.flat, dst[:n], after)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hookwise-offload-stage")
        self.stats.note("load", src.kind, n)
        return self._pool.submit(self._staged, src, dst[:n], after)

    def _staged(self, src: HostSource, dst: torch.Tensor, after: Any) -> Any:
        """Host memcpy into pinned chunks, each followed by its async device copy (worker thread)."""
        event = None
        for start, end in chunks(src.nbytes, self.ring.chunk):
            index, buf = self.ring.acquire()
            host = buf[: end - start]
            src.read_into(host, start)
            event = self._issue(host, dst[start:end], after if start == 0 else None)
            self.ring.release(index, event)
            self.stats.staged_chunks += 1
        return event

    def wait(self, ticket: Any) -> None:
        event = ticket.result() if isinstance(ticket, Future) else ticket
        if event is not None:
            self.backend.current_stream().wait_event(event)
            self.stats.note("wait")

    def mark_done(self) -> Any:
        event = self.backend.new_event()
        event.record(self.backend.current_stream())
        self.stats.note("mark")
        return event

    def copy_back(self, view: torch.Tensor, master: torch.Tensor) -> None:
        # Issued on the compute stream after the in-place change; a blocking copy into host memory.
        master.copy_(view, non_blocking=False)
        self.stats.writebacks += 1
        self.stats.note("writeback", view.numel() * view.element_size())

    def read_ahead(self, src: HostSource) -> None:
        """Nothing: the staging thread reads the file itself, in order, when the load is issued."""

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        super().close()


def make_engine(device: torch.device, *, streams: bool) -> TransferEngine:
    """The engine for `device`: a copy stream and events on CUDA when asked, else synchronous copies."""
    return StreamEngine(device) if streams else SyncEngine(device)
