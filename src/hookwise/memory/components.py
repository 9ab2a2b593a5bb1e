"""Component offloading: in a pipeline of several models, only the ones in use sit on the device.

    apply_component_offload(pipe, ComponentOffload(onload_device="cuda",
                                                   keep_together=(("text_encoder", "text_encoder_2"),)))

Works on a diffusers pipeline (its `components`, in its `model_cpu_offload_seq` order), on a dict of
modules, or (through `hookwise.apply`) on a module whose children are the components. When a
component is called (its own forward or any direct child's, so `vae.decode` counts), it is loaded
onto the device in one copy from its flat host buffer, and every other component on the device is
dropped there, except those listed with it in `keep_together`. Dropping costs nothing: the host
copy is the master (a component changed in place is written back first). A component that has
`Offload` applied manages its own weights and is left alone.

`hookwise.set_component` / `pop_component` change a pipeline's components under it: the plan takes
the new component on and lets the old one go (`replan_components`), leaving the others where they
are, and `component_offload_report` shows the plan.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..core import HookRegistry, Layer, ModelHook, TechniqueConfig, add_hook, current_transaction, register_technique
from ..core import apply_techniques, remove_hooks, remove_techniques, transaction, unwrap
from ..core.cost import CostContext, Placement, TechniqueCost
from ..errors import CompatibilityError, ConfigError, NoTargetError
from ._placement import COMPONENT_HOOK, home_device, offload_applied, parse_device, pin_allowance, to_device
from ._groups import Group, TensorRef, tensors_of
from ._binding import GroupState
from ._transfer import HostSource, TransferEngine, make_engine

logger = logging.getLogger("hookwise.memory.components")

_CONTROLLERS: str = "_hookwise_component_offload"  # attribute on a dict-free target (module or pipeline)


@dataclasses.dataclass(frozen=True)
class ComponentOffload(TechniqueConfig):
    """Keep only the components in use on the device.

    - `onload_device`: where components compute ("cuda", "cuda:1", "cpu").
    - `order`: component names in the order the pipeline uses them (default: the pipeline's
      `model_cpu_offload_seq`, else the order given); only used to validate and report.
    - `keep_together`: groups of component names that may stay on the device together (for
      example the two text encoders of FLUX).
    - `pin`: "auto" / "all" / "none": pin host copies (CUDA only) for faster, asynchronous loads.
    """

    onload_device: str = "cuda"
    order: tuple[str, ...] | None = None
    keep_together: tuple[tuple[str, ...], ...] = ()
    pin: str = "auto"

    def validate(self) -> None:
        parse_device(self.onload_device, "onload_device")
        if self.pin not in ("auto", "all", "none"):
            raise ConfigError(f"pin={self.pin!r}: use 'auto', 'all' or 'none'")
        if self.order is not None and len(set(self.order)) != len(self.order):
            raise ConfigError(f"order={self.order!r} names a component twice")
        for together in self.keep_together:
            if isinstance(together, str) or len(together) < 2:
                raise ConfigError(
                    f"keep_together entries are tuples of at least two component names, got {together!r}"
                )


class _Component:
    def __init__(self, name: str, module: nn.Module, state: GroupState | None, home: torch.device) -> None:
        self.name = name
        self.module = module
        self.state = state  # None: managed elsewhere (has its own Offload), never moved here
        self.home = home
        self.active = False


class _ComponentOffloader:
    def __init__(self, components: dict[str, nn.Module], config: ComponentOffload, order: list[str]) -> None:
        self.config = config
        self.onload = parse_device(config.onload_device, "onload_device")
        if self.onload.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"onload_device={config.onload_device!r} but CUDA is not available; pass onload_device='cpu' or run "
                f"where a GPU is visible"
            )
        self.engine: TransferEngine = make_engine(self.onload, streams=self.onload.type == "cuda")
        self.order = order
        self.components: dict[str, _Component] = {}
        self.together = _together(list(components), config)
        self.loads = 0
        self._raw = components
        self._marker: Any = None  # passes when compute that read the last dropped component is done

    def build(self) -> None:
        txn = current_transaction()
        txn.on_rollback(self.engine.close, "component engine")
        pin_left = 0.0
        if self.engine.streams:
            host = sum(t.numel() * t.element_size() for m in self._raw.values() for t in m.parameters() if t.device.type == "cpu")
            pin_left = pin_allowance(self.config.pin, host)
        for name, module in self._raw.items():
            comp, pinned = self._manage(name, module, pin_left)
            pin_left -= pinned
            if comp is not None:
                self.components[name] = comp
        if not any(c.state is not None for c in self.components.values()):
            raise NoTargetError("ComponentOffload found no component with weights to manage")

    def _manage(self, name: str, module: nn.Module, pin_left: float) -> tuple[_Component | None, int]:
        """Take `module`'s weights into a flat host copy and hook it (undone with the open transaction);
        returns its entry (None: no weights) and the bytes pinned."""
        txn = current_transaction()
        home = home_device(module)
        if offload_applied(module):
            logger.info("hookwise component offload: %s has its own Offload; leaving it alone", name)
            return _Component(name, module, None, home), 0
        refs = _unique(tensors_of(module))
        if not refs:
            return None, 0
        group = Group(0, name, "component", [("", module)], refs, in_tower=False)
        group.layout()
        flat, pinned = self.engine.alloc_host(group.nbytes, pin_left >= group.nbytes)
        for ref in refs:
            ref.view_in(flat).copy_(ref.tensor.data)
        state = GroupState(group, HostSource(flat, "pinned" if pinned else "pageable"))
        for ref, master in zip(refs, state.masters):
            device = ref.tensor.device
            ref.tensor.data = master
            txn.on_rollback(lambda t=ref.tensor, d=device, m=master: setattr(t, "data", m.to(d, copy=True)))
        add_hook(module, _ComponentHook(self, name, root=True), COMPONENT_HOOK)
        for child_name, child in module.named_children():
            add_hook(child, _ComponentHook(self, name, root=False), COMPONENT_HOOK)
        return _Component(name, module, state, home), group.nbytes if pinned else 0

    def replan(
        self, name: str, module: nn.Module | None, order: list[str], config: ComponentOffload
    ) -> _Component | None:
        """Take `module` on as component `name` in place of the one there (None: the name leaves), with
        the components' new `order` and `config`; returns the entry replaced.

        Undone with the open transaction. The replaced entry keeps its weights and hooks until
        `release`, so that undoing needs nothing but putting it back.
        """
        before = (self.components, self.order, self.config, self.together)
        current_transaction().on_rollback(lambda: self._restore_plan(*before), "component offload plan")
        components = dict(self.components)
        old = components.pop(name, None)
        if module is not None:
            pin_left = 0.0
            if self.engine.streams:
                host = sum(t.numel() * t.element_size() for t in module.parameters() if t.device.type == "cpu")
                pin_left = pin_allowance(config.pin, host)
            comp, _ = self._manage(name, module, pin_left)
            if comp is not None:
                components[name] = comp
        self.components = {n: components[n] for n in order if n in components}
        self.order, self.config, self.together = list(order), config, _together(order, config)
        if not any(c.state is not None for c in self.components.values()):
            raise NoTargetError(
                f"without {name!r} component offloading would have no component with weights to manage; remove it "
                f"first (remove_component_offload)"
            )
        return old

    def _restore_plan(self, components: dict[str, _Component], order: list[str], config: ComponentOffload,
                      together: dict[str, set[str]]) -> None:  # fmt: skip
        self.components, self.order, self.config, self.together = components, order, config, together

    def release(self, comp: _Component) -> None:
        """Give a component that left the plan its weights back on its home device, and take its hooks off."""
        if comp.state is None:
            return
        if comp.active:
            self._deactivate(comp)
        for ref, master in zip(comp.state.group.tensors, comp.state.masters):
            if ref.current() is ref.tensor:
                ref.tensor.data = master.to(comp.home, copy=True)
        remove_hooks(comp.module, lambda name, hook: name == COMPONENT_HOOK and isinstance(hook, _ComponentHook))

    # ---- running ------------------------------------------------------------------------------------
    def activate(self, name: str) -> None:
        comp = self.components[name]
        if comp.active or comp.state is None:
            return
        for other in self.components.values():
            if other.active and other.name not in self.together[name]:
                self._deactivate(other)
        st = comp.state
        with torch.inference_mode(False):  # not inference tensors: the component may train later
            flat = self.engine.alloc_slot(st.group.nbytes)
            views = [ref.view_in(flat) for ref in st.group.tensors]
        # The new buffer may reuse memory the dropped component's kernels still read: wait for them.
        self.engine.wait(self.engine.start_load(st.source, flat, self._marker))
        st.bind(views, grads=False)
        comp.active = True
        self.loads += 1
        logger.debug("hookwise component offload: %s on %s", name, self.onload)

    def _deactivate(self, comp: _Component) -> None:
        st = comp.state
        st.unbind(self.engine, settle_grads=False)  # what changed in place on the device is written back
        st.views = []
        comp.active = False
        self._marker = self.engine.mark_done()

    def on_device(self) -> list[str]:
        """Names of the components whose weights are on the device now."""
        return [c.name for c in self.components.values() if c.active]

    def close(self) -> None:
        for comp in self.components.values():
            self.release(comp)
        self.engine.close()


class _ComponentHook(ModelHook):
    layer = Layer.COMPONENT

    def __init__(self, offloader: _ComponentOffloader, name: str, *, root: bool) -> None:
        self.offloader = offloader
        self.name = name
        self.root = root

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.offloader.activate(self.name)
        if self.root:
            device = self.offloader.onload
            return to_device(args, device), to_device(kwargs, device)
        return args, kwargs


def _unique(refs: Any) -> list[TensorRef]:
    seen: set[int] = set()
    out = []
    for ref in refs:
        if id(ref.tensor) not in seen:
            seen.add(id(ref.tensor))
            out.append(ref)
    return out


def _components_of(target: Any) -> tuple[dict[str, nn.Module], list[str]]:
    """(name -> module, default order) of a pipeline, a dict, or a module's children."""
    if isinstance(target, Mapping):
        comps = {k: unwrap(v) for k, v in target.items() if isinstance(v, nn.Module)}
    elif isinstance(target, nn.Module):
        comps = {k: unwrap(v) for k, v in target.named_children()}
    elif isinstance(getattr(target, "components", None), Mapping):
        comps = {k: unwrap(v) for k, v in target.components.items() if isinstance(v, nn.Module)}
    else:
        raise ConfigError(
            f"ComponentOffload works on a diffusers pipeline, a dict of modules, or a module whose children are the "
            f"components; got {type(target).__name__}"
        )
    return comps, _default_order(target, list(comps))


def _default_order(target: Any, names: list[str]) -> list[str]:
    """`names` in the order a pipeline's `model_cpu_offload_seq` gives, the rest as they come."""
    seq = "" if isinstance(target, (Mapping, nn.Module)) else getattr(target, "model_cpu_offload_seq", None) or ""
    first = [n for n in seq.split("->") if n in names]
    return first + [n for n in names if n not in first]


def _planned_order(names: list[str], default_order: list[str], config: ComponentOffload) -> list[str]:
    """The components' order: `config.order` first, then the default order; every name it uses must exist."""
    named = set(config.order or ()) | {n for group in config.keep_together for n in group}
    unknown = sorted(named - set(names))
    if unknown:
        raise ConfigError(f"ComponentOffload names unknown component(s) {unknown}; the components are {sorted(names)}")
    if not config.order:
        return default_order
    return list(config.order) + [n for n in default_order if n not in config.order]


def _together(names: list[str], config: ComponentOffload) -> dict[str, set[str]]:
    together = {name: {name} for name in names}
    for group in config.keep_together:
        for name in group:
            together[name].update(group)
    return together


def _without(config: ComponentOffload, name: str) -> ComponentOffload:
    """`config` with component `name` gone from its order and its keep-together groups."""
    order = tuple(n for n in config.order if n != name) if config.order else None
    groups = (tuple(n for n in group if n != name) for group in config.keep_together)
    return dataclasses.replace(config, order=order or None, keep_together=tuple(g for g in groups if len(g) >= 2))


def apply_component_offload(target: Any, config: ComponentOffload | None = None, **kwargs: Any) -> list[str]:
    """Apply component offloading to a pipeline / dict / module (all-or-nothing); returns the order.

    On a module, the same as `hookwise.apply(target, config)`. A pipeline or a dict of modules has no
    forward of its own and no ledger, so it gets the handler directly and loses it with
    `remove_component_offload`.
    """
    if config is None:
        config = ComponentOffload(**kwargs)
    elif kwargs:
        raise ConfigError("pass either a ComponentOffload config or keyword arguments, not both")
    if not isinstance(unwrap(target), nn.Module):
        return _apply_component_offload(target, config)
    apply_techniques(target, [config])
    return list(_controller(unwrap(target)).order)


def remove_component_offload(target: Any) -> None:
    """Undo component offloading: every component back on the device it was on, with its values.

    On a module, the same as `hookwise.remove(target, "component_offload")`.
    """
    if not isinstance(unwrap(target), nn.Module):
        _remove_component_offload(target)
        return
    remove_techniques(target, ["component_offload"])


def _apply_component_offload(target: Any, config: ComponentOffload | None = None, **kwargs: Any) -> list[str]:
    if config is None:
        config = ComponentOffload(**kwargs)
    elif kwargs:
        raise ConfigError("pass either a ComponentOffload config or keyword arguments, not both")
    if _controller(target) is not None:
        raise CompatibilityError("component offloading is already applied here; remove_component_offload first")
    comps, default_order = _components_of(target)
    if not comps:
        raise NoTargetError(f"{type(target).__name__} has no nn.Module component to offload")
    order = _planned_order(list(comps), default_order, config)
    comps = {name: comps[name] for name in order}
    with transaction(), torch.inference_mode(False):
        controller = _ComponentOffloader(comps, config, order)
        controller.build()
        _set_controller(target, controller)
    return order


def _remove_component_offload(target: Any, config: ComponentOffload | None = None) -> None:
    controller = _controller(target)
    if controller is None:
        raise ConfigError("no component offloading to remove here")
    controller.close()
    _set_controller(target, None)


def replan_components(
    target: Any, name: str, module: nn.Module | None, components: Mapping[str, nn.Module]
) -> Callable[[], None] | None:
    """Re-plan `target`'s component offloading for `module` as component `name` (None: `name` leaves).

    `components` are the target's components once changed, in its order. Runs inside the open
    transaction and is undone with it; returns the step that finishes the change once nothing can
    fail any more (the component replaced or removed gets its weights back on the device it came
    from and loses its hooks), or None when `target` has no component offloading.
    """
    controller = _controller(target)
    if controller is None:
        return None
    config = controller.config if module is not None else _without(controller.config, name)
    comps = {n: unwrap(m) for n, m in components.items() if isinstance(m, nn.Module)}
    order = _planned_order(list(comps), _default_order(target, list(comps)), config)
    with torch.inference_mode(False):  # host copies that are not inference tensors: the component may train later
        old = controller.replan(name, unwrap(module) if module is not None else None, order, config)

    def finish() -> None:
        if old is not None:
            controller.release(old)

    return finish


def component_offload_report(target: Any) -> dict[str, Any]:
    """What component offloading manages now: the order, the config, each component's host bytes,
    whether it is managed here ("own offload": it has its own `Offload`) and pinned, what is on the
    device, and how many loads have happened."""
    controller = _controller(target)
    if controller is None:
        raise ConfigError("no component offloading here; apply it with apply_component_offload(target, ...)")
    components = {}
    for comp in controller.components.values():
        if comp.state is None:
            components[comp.name] = {"managed": "own offload", "host_bytes": 0, "pinned": False}
        else:
            source = comp.state.source
            components[comp.name] = {"managed": "here", "host_bytes": source.nbytes, "pinned": source.kind == "pinned"}
    return {
        "onload_device": str(controller.onload),
        "order": list(controller.order),
        "config": controller.config,
        "components": components,
        "on_device": controller.on_device(),
        "loads": controller.loads,
    }


def components_on_device(target: Any) -> list[str]:
    """Names of the components whose weights sit on the device now."""
    controller = _controller(target)
    if controller is None:
        raise ConfigError("no component offloading here")
    return controller.on_device()


def _controller(target: Any) -> _ComponentOffloader | None:
    if isinstance(target, Mapping):
        for module in target.values():
            if isinstance(module, nn.Module):
                hook = _component_hook(unwrap(module))
                if hook is not None:
                    return hook.offloader
        return None
    return getattr(target, "__dict__", {}).get(_CONTROLLERS)


def _set_controller(target: Any, controller: _ComponentOffloader | None) -> None:
    if isinstance(target, Mapping):
        return  # found again through the hooks of its modules
    if controller is None:
        target.__dict__.pop(_CONTROLLERS, None)
    else:
        target.__dict__[_CONTROLLERS] = controller
        current_transaction().on_rollback(lambda: target.__dict__.pop(_CONTROLLERS, None), "component controller")


def _component_hook(module: nn.Module) -> _ComponentHook | None:
    registry = HookRegistry.of(module)
    hook = registry.get(COMPONENT_HOOK) if registry else None
    return hook if isinstance(hook, _ComponentHook) else None


# ---- cost declaration (for the planner) -------------------------------------------------------------
def _component_effect(placement: Placement, config: ComponentOffload, ctx: CostContext) -> Placement:
    """The pipeline's other components wait in host RAM while the denoiser runs; each is loaded
    whole when called (once per generation, not per step), so only the largest one needs room then."""
    moved_note = "the other components load once per generation (text encoders before, the VAE after)"
    return dataclasses.replace(
        placement,
        device_bytes=0,
        host_bytes=placement.host_bytes + placement.device_bytes,
        notes=(*placement.notes, moved_note),
    )


def _component_options(placement: Placement, ctx: CostContext) -> list[ComponentOffload]:
    if placement.device_bytes <= 0:
        return []
    return [ComponentOffload(onload_device="cpu" if ctx.hardware.device == "cpu" else "cuda")]


register_technique(
    "component_offload",
    ComponentOffload,
    apply=_apply_component_offload,
    remove=_remove_component_offload,
    layer=Layer.OFFLOAD,
    conflicts=("offload",),
    cost=TechniqueCost(_component_effect, _component_options, scope="pipeline"),
)
