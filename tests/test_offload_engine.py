"""Transfer engines on the CPU: the stream engine's ordering with a recording fake device, the pinned
staging ring, and the synchronous engine's read-ahead for disk.

`StreamEngine` talks to CUDA through a backend object; the fake below runs its copies
synchronously on the CPU and records every stream / event operation, so the whole scheduler +
engine path (copy stream, flat pinned buffers, events, staging ring) is checked here and only the
real asynchrony needs a GPU (tests/test_offload_gpu.py).
"""

import contextlib

import pytest
import torch

from hookwise.memory import Offload, apply_offload, offload_report
from hookwise.memory import offload as offload_module
from hookwise.memory._disk import DiskFile
from hookwise.memory._transfer import StagingRing, StreamEngine, SyncEngine, chunks
from offload_helpers import add_lora, assert_same, fwd_bwd, scheduler, strict
from model_helpers import output_of, tiny_musubi


class FakeEvent:
    count = 0

    def __init__(self, log):
        FakeEvent.count += 1
        self.id = FakeEvent.count
        self.log = log
        self.recorded = None

    def record(self, stream):
        self.recorded = stream.name
        self.log.append(("record", self.id, stream.name))

    def synchronize(self):
        self.log.append(("event.synchronize", self.id, self.recorded))


class FakeStream:
    def __init__(self, name, log):
        self.name = name
        self.log = log

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.id, event.recorded))

    def synchronize(self):  # device-wide for practical purposes: must never be called
        self.log.append(("stream.synchronize", self.name))


class FakeBackend:
    def __init__(self):
        self.log = []
        self.compute = FakeStream("compute", self.log)
        self.current = self.compute
        self.pinned_bytes = 0

    def new_stream(self):
        return FakeStream("copy", self.log)

    def current_stream(self):
        return self.current

    @contextlib.contextmanager
    def use_stream(self, stream):
        previous, self.current = self.current, stream
        self.log.append(("enter", stream.name))
        try:
            yield
        finally:
            self.current = previous

    def new_event(self):
        return FakeEvent(self.log)

    def pinned(self, nbytes):
        self.pinned_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8)


def with_fake_streams(monkeypatch, chunk=None):
    backend = FakeBackend()
    engines = []

    def make_engine(device, *, streams):
        engine = StreamEngine(device, backend, **({"chunk": chunk} if chunk else {}))
        engines.append(engine)
        return engine

    monkeypatch.setattr(offload_module, "make_engine", make_engine)
    return backend, engines


@pytest.mark.parametrize("pin", ["all", "none"])
def test_stream_engine_orders_copies_and_compute_with_events_only(monkeypatch, pin):
    backend, engines = with_fake_streams(monkeypatch, chunk=4096)
    model, inputs = tiny_musubi()
    add_lora(model)
    expected = fwd_bwd(model, inputs)
    with torch.no_grad():
        expected_eval = model(**inputs)
    # use_streams is a CUDA-only switch in the config; the fake backend stands in for CUDA here.
    apply_offload(model, Offload(onload_device="cpu", granularity="block", pin="auto" if pin == "all" else "none"))
    engine = engines[0]
    strict(model)
    for _ in range(3):
        assert_same(fwd_bwd(model, inputs), expected)
        with torch.no_grad():
            assert torch.equal(model(**inputs), expected_eval)
    sched = scheduler(model)
    sched.flush()  # wait for the staging thread's last prefetch before reading the log
    log = backend.log
    report = offload_report(model)
    # Never a device-wide synchronize; a host wait only on a staging buffer's own copy event.
    assert not [e for e in log if e[0] == "stream.synchronize"]
    host_waits = [e for e in log if e[0] == "event.synchronize"]
    if pin == "all":
        assert report.pinned_host_bytes == report.host_bytes > 0
        assert host_waits == []
        assert engine.stats.staged_chunks == 0
    else:
        assert report.pinned_host_bytes == 0
        assert engine.stats.staged_chunks > engine.stats.loads  # groups larger than a chunk
        assert all(e[2] == "copy" for e in host_waits)
        assert backend.pinned_bytes == engine.ring.nbytes == 4 * 4096  # only the ring is pinned
    # Compute waits for every load it uses; every reuse of a slot waits for compute to let it go.
    waits_on_copy = [e for e in log if e[0] == "wait_event" and e[1] == "compute" and e[3] == "copy"]
    stats = report.stats
    assert len(waits_on_copy) >= stats["loads"] - stats["prefetches"] + stats["prefetch_hits"]
    copy_waits_on_compute = [e for e in log if e[0] == "wait_event" and e[1] == "copy" and e[3] == "compute"]
    assert len(copy_waits_on_compute) == stats["loads"] - report.slots


def test_a_pinned_group_moves_in_one_copy(monkeypatch):
    backend, engines = with_fake_streams(monkeypatch)
    model, inputs = tiny_musubi()
    model.requires_grad_(False)
    apply_offload(model, Offload(onload_device="cpu", granularity="block", pin="auto"))
    engine = engines[0]
    engine.stats.log = []
    output_of(model, inputs)
    loads = [e for e in engine.stats.log if e[0] == "load"]
    copies = [e for e in engine.stats.log if e[0] == "copy"]
    assert loads and all(kind == "pinned" for _, kind, _ in loads)
    assert len(copies) == len(loads)  # one copy per group, not one per tensor
    assert [n for _, _, n in loads] == [n for _, n, _ in copies]


def test_staging_ring_reuses_a_buffer_only_after_its_own_copy_event():
    log = []
    ring = StagingRing(lambda n: torch.empty(n, dtype=torch.uint8), chunk=8, count=2)
    events = []
    for i in range(5):
        index, buf = ring.acquire()
        assert index == i % 2 and buf.numel() == 8
        event = FakeEvent(log)
        event.recorded = f"copy{i}"
        events.append(event)
        ring.release(index, event)
    waited = [e[2] for e in log if e[0] == "event.synchronize"]
    assert waited == ["copy0", "copy1", "copy2"]  # buffer k waits for the copy that last used it
    assert ring.host_waits == 3 and ring.nbytes == 16


def test_chunks_cover_every_byte_once():
    assert chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunks(8, 4) == [(0, 4), (4, 8)]
    assert chunks(0, 4) == [(0, 0)]


def test_on_the_cpu_disk_groups_are_read_ahead_at_prefetch_used_in_place_and_released(tmp_path, monkeypatch):
    events = []
    real = {name: getattr(DiskFile, name) for name in ("will_need", "read_into", "drop_pages")}

    def record(name, kind):
        def call(self, *a, **k):
            events.append((kind, self.path.name))
            return real[name](self, *a, **k)

        return call

    monkeypatch.setattr(DiskFile, "will_need", record("will_need", "readahead"))
    monkeypatch.setattr(DiskFile, "read_into", record("read_into", "copy"))
    monkeypatch.setattr(DiskFile, "drop_pages", record("drop_pages", "release"))
    model, inputs = tiny_musubi()
    model.requires_grad_(False)
    expected = output_of(model, inputs)
    report = apply_offload(model, Offload(onload_device="cpu", offload_device="disk", disk_path=str(tmp_path), granularity="block"))
    sched = scheduler(model)
    assert type(sched.engine) is SyncEngine and report.slots == 0
    assert torch.equal(output_of(model, inputs), expected)  # records the order
    files = {g.name: g.file.rsplit("/", 1)[-1] for g in offload_report(model).groups}
    events.clear()
    sched.trace = events  # one timeline: ("use", group, backward) entries among the disk events
    assert torch.equal(output_of(model, inputs), expected)
    sched.engine.close()  # joins the read-ahead thread, so its calls are all in `events`
    order = [name for kind, name, *_ in events if kind == "use"]
    assert order == list(offload_report(model).order)
    assert not [e for e in events if e[0] == "copy"]  # computed on in place: no copy at all
    for prev, name in zip(order, order[1:]):
        f = files[name]
        # Group k+1's read-ahead is asked for when group k starts (a helper thread makes the
        # call); its pages are released after it ran.
        assert events.index(("use", prev, False)) < events.index(("load", name, True)) < events.index(("use", name, False))
        assert ("readahead", f) in events
        assert events.index(("use", name, False)) < events.index(("release", f))
    assert offload_report(model).stats["on_demand"] == len(order)  # only the first pass, which had no order yet
