"""The offload scheduler: which streamed group sits in which device slot, and what to prefetch.

Shared by every transfer engine, so the CPU tests run the same decisions as a GPU:

- **Slots.** A few device buffers, each as large as the largest streamed group, allocated once.
  Loading a group copies its flat bytes into a slot; binding points each of its parameters and
  buffers (`tensor.data`) at a view into that slot. Unbinding points them back at the host master.
  Within one step a group stays in its slot after use until the slot is needed (so a forward
  followed by its backward reuses what is still there); the least recently used group that is not
  in use is evicted. Between calls no slot copy is trusted (see Writes): every slot is emptied when
  a call or a backward ends and when a call begins.
  Binding, unbinding, write-back and gradient settling are the group's own (`GroupState`, in
  `_binding.py` with the slots), so component offloading binds whole models the same way.
- **Direct groups.** When the engine computes on a source in place (a mapped file on the CPU),
  a group has no slot: prefetching it starts an OS read-ahead, and after use its pages are
  released (unless written). Order, prefetch and counters are the same.
- **Order.** Each forward pass records the order in which streamed groups are needed; the next
  pass prefetches along it (`depth` groups ahead). Backward records its own order and, until it has
  one, walks the forward order in reverse. A group that was not predicted loads on demand.
- **Backward.** With gradients enabled, tensors autograd saves that live in a slot are packed as
  references to their group (`saved_tensors_hooks`), not kept alive: backward loads the group
  again (prefetching the group before it) and rebuilds the same view. Gradient checkpointing
  (reentrant or not) re-runs the checkpointed code in backward. Around a module call that loads
  the group through its hook; but a block may checkpoint its own body
  (`checkpoint(self._forward, ...)`), whose recompute runs outside the block's call and reaches
  no hook of its group. So a module call of a group with submodules also marks the autograd nodes
  that produced its outputs: before backward runs one of them, the group is loaded and kept, and
  every recompute of the call's region comes after that node (it is triggered by the region's own
  nodes, which only run once the output's node has passed its gradient on).
- **Writes.** If a bound tensor was changed in place (its version counter moved) or its `.data`
  was replaced, unbinding copies the new values into the host master first, so no update is lost;
  a change made to an unbound tensor (its host master) makes the next use copy the group again.
  A write through `tensor.data` (`p.data.add_(1)`, diffusers' `EMAModel.copy_to`, LoRA fusing)
  moves no version counter (`.data` is a new tensor with its own counter), so it cannot be seen.
  Hence between calls, when user code runs, no tensor points into a slot and no slot copy is
  reused: the write lands in the host master and the next call copies it. A group's copy survives
  only within one step (a forward and its backward), as the peers' group offloading and block swap
  copy every call too.
- **Trainable tensors** (with `offload_trainable`) get their gradients moved to the host master's
  device when they are unbound and at the end of each backward, so an optimizer sees one device.
- **torch.compile.** The entry points the hooks call (pass boundaries, `acquire`, `release`,
  `saving`) are `torch.compiler.disable`d: they run eagerly between compiled graphs, so the
  scheduler's counters and slot choices never become guards (traced, they made every call
  recompile until dynamo gave up on the block). Parameters are graph inputs, so a block compiled
  once runs on whichever slot its group occupies.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_leaves

from ..errors import HookError
from ._binding import GroupState, Slot, address, storage_key
from ._groups import TensorRef
from ._transfer import TransferEngine

logger = logging.getLogger("hookwise.memory.schedule")


@dataclass
class Stats:
    """Counters since the technique was applied (tests and the report read them)."""

    passes: int = 0
    loads: int = 0
    bytes_loaded: int = 0
    on_demand: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    mispredictions: int = 0
    writebacks: int = 0
    overflow_slots: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _poison(like: torch.Tensor) -> torch.Tensor:
    if like.dtype.is_floating_point or like.dtype.is_complex:
        fill: Any = float("nan")
    elif like.dtype == torch.bool:
        fill = True
    else:
        fill = torch.iinfo(like.dtype).max
    with torch.inference_mode(False):
        return like.new_full((1,), fill).expand(like.shape)


@dataclass(frozen=True)
class _Saved:
    """What a saved tensor living in a slot is packed into: its group and where it sits."""

    state: GroupState
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


class _Cursor:
    """Position in a recorded order; says which groups come next."""

    def __init__(self) -> None:
        self.order: list[GroupState] = []
        self.positions: dict[int, list[int]] = {}
        self.pos = 0
        self.last: GroupState | None = None

    def set(self, order: list[GroupState]) -> None:
        self.order = list(order)
        self.positions = {}
        for i, st in enumerate(self.order):
            self.positions.setdefault(id(st), []).append(i)
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.last = None

    def peek(self, depth: int) -> list[GroupState]:
        return self.order[self.pos : self.pos + depth]

    def advance(self, st: GroupState, depth: int, stats: Stats) -> list[GroupState]:
        """Note that `st` is needed now; the groups predicted to follow it."""
        if st is self.last:
            return []
        self.last = st
        if not self.order:
            return []
        if self.pos < len(self.order) and self.order[self.pos] is st:
            self.pos += 1
        else:
            found = self.positions.get(id(st))
            if not found:
                return []
            stats.mispredictions += 1
            self.pos = next((p for p in found if p >= self.pos), found[0]) + 1
        return self.order[self.pos : self.pos + depth]


def _output_nodes(output: Any) -> list[Any]:
    """The autograd nodes that produced the tensors in `output`, each once."""
    nodes = {id(t.grad_fn): t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn}
    return list(nodes.values())


class Scheduler:
    """Decides loads, prefetches, binds and evictions for the streamed groups of one model."""

    def __init__(
        self, states: list[GroupState], engine: TransferEngine, *, slots: int, slot_bytes: int, depth: int
    ) -> None:
        self.states = states
        self._files = [st.source.disk for st in states if st.source.disk is not None]
        self.engine = engine
        self.depth = depth
        self.slot_bytes = slot_bytes
        for st in states:
            st.direct = engine.direct(st.source)
            if st.direct:
                st.loaded_versions = st.current_versions()
        copied = any(not st.direct for st in states)
        self.slots = [Slot(i, engine.alloc_slot(slot_bytes)) for i in range(slots if copied else 0)]
        self._by_ptr = {s.ptr: s for s in self.slots}
        self.stats = Stats()
        self.forward_order: list[GroupState] = []
        self.backward_order: list[GroupState] = []
        self._fcur = _Cursor()
        self._bcur = _Cursor()
        self._recording: list[GroupState] | None = None
        self._brecording: list[GroupState] | None = None
        self.phase = "idle"  # "forward" | "forward-done" | "backward" | "idle"
        self._pass_depth = 0
        self._tick = 0
        self._current: GroupState | None = None
        self._node: Any = None
        self._node_groups: set[int] = set()
        self._stale_warned: set[str] = set()
        self._pack, self._unpack = self.pack, self.unpack  # one bound method each, for the hooks stack
        # Strict mode (tests): an unbound tensor holds a poisoned placeholder (its shape, NaN or the
        # dtype's max everywhere) instead of its host master, so a streamed weight used outside its
        # group's hooks corrupts the result visibly, also on the CPU where the master would work.
        self.strict = False
        # When a list: ("use", group, backward) / ("load", group, prefetch) / ("evict", group) events.
        self.trace: list[tuple[str, str, bool]] | None = None
        # While groups are held resident (`hold`): every state and the orders recorded before.
        self._all: tuple[list[GroupState], list[GroupState], list[GroupState]] | None = None

    def set_strict(self, strict: bool = True) -> None:
        """Turn strict mode on or off; unbound tensors are re-pointed accordingly."""
        self.strict = strict
        for st in self._all[0] if self._all is not None else self.states:
            st.homes = [self._home(st, i) for i in range(len(st.masters))]
            if not st.bound:
                for ref, home in zip(st.group.tensors, st.homes):
                    if ref.current() is ref.tensor:
                        ref.tensor.data = home

    def _home(self, st: GroupState, i: int) -> torch.Tensor:
        master = st.masters[i]
        # A direct group's master is what the device computes on: never poisoned.
        return _poison(master) if self.strict and not st.direct else master

    @property
    def streaming(self) -> bool:
        return bool(self.states)

    def hold(self, held: list[GroupState]) -> None:
        """Stream every group but those of `held` from now on; `hold([])` streams them all again.

        The offloader keeps the held groups resident (bound to device copies of their host masters)
        while a larger budget allows it, and their group hooks pass calls through. Between calls
        nothing is bound, so the slots are emptied first. The recorded orders are kept whole while
        groups are held (the prefetch follows them with the held groups left out) and come back
        unchanged, so the schedule after `hold([])` is the one before.
        """
        self.flush()
        if self._all is None:
            self._all = (self.states, self.forward_order, self.backward_order)
        states, forward, backward = self._all
        for st in states:
            st.held = any(st is h for h in held)
        if held:
            self.states = [st for st in states if not st.held]
            self.forward_order = [st for st in forward if not st.held]
            self.backward_order = [st for st in backward if not st.held]
        else:
            self.states, self.forward_order, self.backward_order = states, forward, backward
            self._all = None
        self._files = [st.source.disk for st in self.states if st.source.disk is not None]
        self._fcur.set(self.forward_order)
        self._bcur.set(self.backward_order or self.forward_order[::-1])

    # ---- pass boundaries (root hook) ---------------------------------------------------------------
    @torch.compiler.disable
    def begin_pass(self) -> None:
        self._pass_depth += 1
        if self._pass_depth > 1:
            return
        self._commit_backward()
        # A forward with gradients whose backward never ran leaves its groups in their slots.
        self._forget_slots()
        self.phase = "forward"
        self._recording = []
        self._fcur.reset()
        self._node = None
        self._node_groups.clear()
        for nxt in self._fcur.peek(self.depth):
            self._prefetch(nxt)

    @torch.compiler.disable
    def end_pass(self, grad_enabled: bool) -> None:
        self._pass_depth -= 1
        if self._pass_depth > 0:
            return
        recorded, self._recording = self._recording, None
        self.stats.passes += 1
        if recorded and recorded != self.forward_order:
            if self.forward_order:
                logger.debug("hookwise offload: the execution order changed; prefetching along the new one")
            self.forward_order = recorded
            self._fcur.set(recorded)
            if not self.backward_order:
                self._bcur.set(recorded[::-1])
        self._current = None
        if grad_enabled:
            self.phase = "forward-done"
            return
        self.phase = "idle"
        self._forget_slots()

    # ---- use (group hooks, unpack) --------------------------------------------------------------------
    @torch.compiler.disable
    def acquire(self, st: GroupState) -> saved_tensors_hooks | None:
        """A module of `st` is about to run: make its tensors device views, prefetch what follows.

        Returns the saved-tensor hooks to push around the module (see `saving`), or None.
        """
        backward = torch._C._current_graph_task_id() != -1
        saving = None
        foreign = False
        if torch.is_grad_enabled():
            top = torch._C._autograd._top_saved_tensors_default_hooks(False)
            if top is None:
                saving = saved_tensors_hooks(self._pack, self._unpack)
            else:
                foreign = top[0] is not self._pack
        # Under someone else's saved-tensor hooks in backward (a non-reentrant checkpoint
        # recomputing its region), saved tensors are real views into the slot: keep the group.
        self._touch(st, backward, protect=backward and foreign)
        st.in_use += 1
        return saving

    @torch.compiler.disable
    def guard_recompute(self, st: GroupState, output: Any) -> None:
        """Load `st` in backward before the nodes that produced `output` run (see the module docstring)."""
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return
        for node in _output_nodes(output):
            node.register_prehook(functools.partial(self._before_node, st))

    def _before_node(self, st: GroupState, grad_outputs: Any) -> None:
        self._touch(st, backward=True, protect=True)

    @torch.compiler.disable
    def guard_files(self, output: Any) -> None:
        """Check every group file before backward starts on `output` (a model call's result).

        Backward reads the mapped pages that a direct group's saved tensors view with no hook of
        ours in between: a file truncated since the forward would kill the process (SIGBUS).
        """
        if not torch.is_grad_enabled() or not self._files:
            return
        for node in _output_nodes(output):
            node.register_prehook(self._check_files)

    def _check_files(self, grad_outputs: Any = None) -> None:
        for file in self._files:
            file.check()

    @torch.compiler.disable
    def release(self, st: GroupState) -> None:
        st.in_use -= 1
        if st.direct and st.in_use == 0 and not torch.is_grad_enabled() and self.phase != "backward":
            self._cool(st)

    def _cool(self, st: GroupState) -> None:
        """A direct group is done: release its mapped pages (unless they were written)."""
        versions = st.current_versions()
        if versions != st.loaded_versions:
            st.source.mark_written()  # changed in place: its copy-on-write pages must stay
            st.loaded_versions = versions
        st.source.after_read()
        st.hot = False

    def _touch(self, st: GroupState, backward: bool, protect: bool = False) -> None:
        if backward:
            if self.phase != "backward":
                self._enter_backward()
            # What one autograd node loads (the saved weights it unpacks, or a checkpointed region
            # it recomputes, whose recomputed tensors are views into slots) stays until another
            # node needs a group: by then the engine, which runs higher sequence numbers first, is
            # done with every node of that region.
            node = torch._C._current_autograd_node()
            if node is not self._node:
                self._node = node
                self._node_groups.clear()
            if protect:
                self._node_groups.add(id(st))
            cursor, recording = self._bcur, self._brecording
        else:
            cursor, recording = self._fcur, self._recording
        if st.source.disk is not None and not (st.direct and st.hot):
            st.source.disk.check()  # before its pages are read (a truncated file: SIGBUS)
        if recording is not None and (not recording or recording[-1] is not st):
            recording.append(st)
        self._tick += 1
        st.last_use = self._tick
        self._current = st
        if self.trace is not None:
            self.trace.append(("use", st.name, backward))
        if st.direct:
            if not st.hot:
                if st.prefetched:
                    self.stats.prefetch_hits += 1
                else:
                    self.stats.on_demand += 1
                self.stats.loads += 1
                self.stats.bytes_loaded += st.group.nbytes
            st.prefetched = False
            st.hot = True
        elif st.slot is None:
            self.stats.on_demand += 1
            self._load(st, required=True)
        elif not st.bound and self._changed_on_host(st):
            # Updated through its host master (an optimizer step, load_state_dict) since it was
            # copied: the slot is stale, copy again.
            st.ticket = self.engine.start_load(st.source, st.slot.flat, self.engine.mark_done())
            st.loaded_versions = st.current_versions()
            self.stats.loads += 1
            self.stats.bytes_loaded += st.group.nbytes
        elif st.prefetched:
            self.stats.prefetch_hits += 1
        st.prefetched = False
        if st.ticket is not None:
            ticket, st.ticket = st.ticket, None
            self.engine.wait(ticket)
            if st.source.kind == "disk" and st.loaded_versions == st.current_versions():
                # The host has read the file pages into the slot and nothing wrote them: let them go.
                st.source.after_read()
        if not st.bound and not st.direct:
            self._bind(st)
        for nxt in cursor.advance(st, self.depth, self.stats):
            self._prefetch(nxt)

    def _prefetch(self, st: GroupState) -> None:
        if st.direct:
            if not st.hot and not st.prefetched:
                if self.trace is not None:
                    self.trace.append(("load", st.name, True))
                self.engine.read_ahead(st.source)  # the OS reads the file into its cache meanwhile
                st.prefetched = True
                self.stats.prefetches += 1
            return
        if st.slot is None and self._load(st, required=False):
            st.prefetched = True
            self.stats.prefetches += 1

    # ---- backward ---------------------------------------------------------------------------------------
    def _enter_backward(self) -> None:
        self.phase = "backward"
        self._brecording = []
        self._bcur.reset()
        self._current = None
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        except RuntimeError:  # not inside the engine (a hook called by hand): end at the next pass
            pass

    def _end_backward(self) -> None:
        self._commit_backward()
        self.phase = "idle"
        self._current = None
        self._node = None
        self._node_groups.clear()
        self._forget_slots()

    def _cool_all(self) -> None:
        for st in self.states:
            if st.direct and st.hot and st.in_use == 0:
                self._cool(st)

    def _commit_backward(self) -> None:
        recorded, self._brecording = self._brecording, None
        if recorded and recorded != self.backward_order:
            self.backward_order = recorded
            self._bcur.set(recorded)

    @torch.compiler.disable
    def saving(self) -> saved_tensors_hooks | None:
        """Our saved-tensor hooks, when gradients are on and no other saved-tensor hooks are active.

        Pushed by the root hook around the forward and by each group hook around its module, so a
        reentrant checkpoint's recomputation (outside the root's forward) packs its saved weights
        too. Someone else's hooks on top (non-reentrant checkpointing, save_on_cpu) are respected.
        """
        if not self.states or not torch.is_grad_enabled():
            return None
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return None
        return saved_tensors_hooks(self._pack, self._unpack)

    def pack(self, tensor: torch.Tensor) -> Any:
        """saved_tensors_hooks pack: a tensor living in a slot becomes a reference to its group."""
        try:
            ptr = storage_key(tensor)
        except (RuntimeError, NotImplementedError):
            return tensor
        slot = self._by_ptr.get(ptr)
        if slot is None or slot.group is None or not slot.group.bound:
            return tensor
        return _Saved(slot.group, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

    def unpack(self, packed: Any) -> torch.Tensor:
        """saved_tensors_hooks unpack: load the group again and rebuild the saved view."""
        if type(packed) is not _Saved:
            return packed
        st = packed.state
        self._touch(st, backward=True, protect=True)
        return torch.as_strided(st.slot.typed(packed.dtype), packed.shape, packed.stride, packed.offset)

    # ---- slots ----------------------------------------------------------------------------------------
    def _evictable(self, st: GroupState) -> bool:
        return st.in_use == 0 and st is not self._current and id(st) not in self._node_groups

    def _pick_slot(self, required: bool) -> Slot | None:
        free = [s for s in self.slots if s.group is None]
        if free:
            return free[0]
        candidates = [s for s in self.slots if self._evictable(s.group)]
        settled = [s for s in candidates if not s.group.prefetched]
        # A prefetch never evicts another prefetch that is still waiting to be used.
        pool = settled or (candidates if required else [])
        if pool:
            return min(pool, key=lambda s: s.group.last_use)
        if not required:
            return None
        # Every slot is in use (a module re-entered, or one autograd node reads several groups):
        # take more memory rather than overwrite weights that are being read.
        if self.slots and isinstance(self.slots[0].flat, FakeTensor):
            # The planner's fake run computes outside its fake mode: a factory call would allocate.
            flat = self.slots[0].flat.new_empty(self.slot_bytes)
        else:
            flat = self.engine.alloc_slot(self.slot_bytes)
        slot = Slot(len(self.slots), flat)
        self.slots.append(slot)
        self._by_ptr[slot.ptr] = slot
        self.stats.overflow_slots += 1
        logger.warning(
            "hookwise offload: every device slot holds weights still in use, so slot %d was added "
            "(%d bytes beyond the budget's plan). This happens when a checkpointed region spans several "
            "groups (its recomputation keeps all of them): checkpoint per block at granularity='block', "
            "or raise `prefetch` so the plan has more slots",
            slot.index,
            self.slot_bytes,
        )
        return slot

    def _load(self, st: GroupState, *, required: bool) -> bool:
        slot = self._pick_slot(required)
        if slot is None:
            return False
        self._evict(slot)
        if self.trace is not None:
            self.trace.append(("load", st.name, not required))
        self._changed_on_host(st)
        st.loaded_versions = st.current_versions()
        self.engine.read_ahead(st.source)
        st.ticket = self.engine.start_load(st.source, slot.flat, slot.marker)
        slot.marker = None
        slot.group = st
        st.slot = slot
        self.stats.loads += 1
        self.stats.bytes_loaded += st.group.nbytes
        return True

    def _evict(self, slot: Slot) -> None:
        old = slot.group
        if old is None:
            return
        if self.trace is not None:
            self.trace.append(("evict", old.name, False))
        if old.bound:
            self._unbind(old)
        old.slot = None
        old.ticket = None  # a copy never waited for: the next copy into this slot is ordered after it
        old.prefetched = False
        slot.group = None
        slot.marker = self.engine.mark_done()

    # ---- binding -----------------------------------------------------------------------------------------
    def _bind(self, st: GroupState) -> None:
        st.bind(st.views_in(st.slot), self._replaced)

    def _replaced(self, ref: TensorRef) -> None:
        if ref.kind == "param":
            raise HookError(
                f"parameter {ref.path} was replaced after offloading was applied (an adapter injected or "
                f"a layer swapped later?); remove offloading (hookwise.remove / remove_offload), change "
                f"the model, then apply it again"
            )
        if ref.path not in self._stale_warned:
            self._stale_warned.add(ref.path)
            logger.info("hookwise offload: buffer %s was reassigned by the model; it is no longer streamed", ref.path)

    def _unbind(self, st: GroupState) -> None:
        # During backward, AccumulateGrad may still write a device gradient: settle at its end.
        self.stats.writebacks += st.unbind(self.engine, settle_grads=self.phase != "backward")

    def _changed_on_host(self, st: GroupState) -> bool:
        """Whether an unbound group's tensors changed since its slot copy; adopts replaced `.data`."""
        changed = False
        for i, ref in enumerate(st.group.tensors):
            t = ref.tensor
            if ref.current() is not t:
                continue
            home = st.homes[i]
            data = t.data
            if address(data) != address(home) or data.shape != home.shape:
                # `.data` was replaced while offloaded: its values become the new master.
                st.write_back(self.engine, ref, data, st.masters[i])
                self.stats.writebacks += 1
                t.data = home
                changed = True
        if st.loaded_versions and st.loaded_versions != st.current_versions():
            changed = True
        if changed:
            # Changed host pages of a disk-backed group differ from its file: never drop them.
            st.source.mark_written()
        return changed

    def _release_trainable(self) -> None:
        for st in self.states:
            if not st.trainable or st.direct:  # a direct group's tensors never leave the host
                continue
            if st.bound:
                if st.ticket is not None:
                    ticket, st.ticket = st.ticket, None
                    self.engine.wait(ticket)
                self._unbind(st)
            else:
                for i in range(len(st.masters)):
                    st.settle_grad(i)

    def flush(self) -> None:
        """Unbind every group (writing back changes) and empty the slots."""
        self.phase = "idle"
        self._forget_slots()

    def _forget_slots(self) -> None:
        """Unbind every group (writing back changes), empty the slots, settle gradients.

        Run where user code may write weights next (`.data` writes cannot be seen: module docstring).
        """
        for slot in self.slots:
            st = slot.group
            if st is None:
                continue
            if st.ticket is not None:
                ticket, st.ticket = st.ticket, None
                self.engine.wait(ticket)
            self._evict(slot)
        self._current = None
        self._node = None
        self._node_groups.clear()
        self._release_trainable()
        self._cool_all()
