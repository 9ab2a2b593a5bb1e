"""Property: random stacks of hooks on random module trees, added and removed in random orders,
always compute the expected composition and, once all are removed, leave the model exactly as it was."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hookwise.core import ModelHook, add_hook, remove_hook

DIM = 3
LAYERS = (100, 300, 500, 700)


class AddInput(ModelHook):
    def __init__(self, c, layer):
        self.c, self.layer = c, layer

    def pre_forward(self, module, args, kwargs):
        return (args[0] + self.c,), kwargs


class ScaleOutput(ModelHook):
    def __init__(self, c, layer):
        self.c, self.layer = c, layer

    def post_forward(self, module, output):
        return output * self.c


class Affine(ModelHook):
    def __init__(self, c, layer):
        self.c, self.layer = c, layer

    def new_forward(self, module, next_fn, x):
        return next_fn(x * self.c) - self.c


class Both(ModelHook):
    def __init__(self, c, layer):
        self.c, self.layer = c, layer

    def pre_forward(self, module, args, kwargs):
        return (args[0] * self.c,), kwargs

    def post_forward(self, module, output):
        return output + self.c


KINDS = {"add": AddInput, "scale": ScaleOutput, "affine": Affine, "both": Both}


def wrap(kind, c, fn):
    """The reference meaning of one hook around `fn`."""
    if kind == "add":
        return lambda x: fn(x + c)
    if kind == "scale":
        return lambda x: fn(x) * c
    if kind == "affine":
        return lambda x: fn(x * c) - c
    return lambda x: fn(x * c) + c


# A tree is ("leaf",) or ("seq", [children]).
trees = st.recursive(
    st.just(("leaf",)),
    lambda children: st.tuples(st.just("seq"), st.lists(children, min_size=1, max_size=3)),
    max_leaves=6,
)


def build(tree):
    if tree[0] == "leaf":
        return nn.Linear(DIM, DIM)
    return nn.Sequential(*[build(child) for child in tree[1]])


def reference(module, hooks, x):
    """Evaluate `module` on `x` using only the original forwards and the recorded hooks."""
    if isinstance(module, nn.Sequential):
        base = lambda h: _seq(module, hooks, h)  # noqa: E731
    else:
        base = lambda h: nn.functional.linear(h, module.weight, module.bias)  # noqa: E731
    fn = base
    for _, kind, c, _layer, _seq_no in sorted(hooks.get(id(module), []), key=lambda e: (e[3], e[4])):
        fn = wrap(kind, c, fn)
    return fn(x)


def _seq(module, hooks, x):
    for child in module:
        x = reference(child, hooks, x)
    return x


hook_specs = st.tuples(
    st.sampled_from(sorted(KINDS)),
    st.sampled_from([0.5, -1.0, 2.0, 0.25]),
    st.sampled_from(LAYERS),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, data=st.data())
def test_random_hook_stacks_compose_and_restore(tree, data):
    torch.manual_seed(0)
    model = build(tree)
    modules = list(model.modules())
    before = {id(m): (set(m.__dict__), m.__dict__.get("forward")) for m in modules}
    x = torch.randn(2, DIM)
    with torch.no_grad():
        original = model(x)

    hooks: dict[int, list] = {}
    counter = 0
    ops = data.draw(st.lists(st.tuples(st.integers(0, len(modules) - 1), hook_specs, st.booleans()), max_size=12))
    for index, (kind, c, layer), try_remove in ops:
        module = modules[index]
        present = hooks.get(id(module), [])
        if try_remove and present:
            victim = data.draw(st.sampled_from([e[0] for e in present]))
            remove_hook(module, victim)
            hooks[id(module)] = [e for e in present if e[0] != victim]
        else:
            name = f"h{counter}"
            add_hook(module, KINDS[kind](c, layer), name)
            hooks.setdefault(id(module), []).append((name, kind, c, layer, counter))
            counter += 1
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(model, hooks, x))

    remaining = [(m, e[0]) for m in modules for e in hooks.get(id(m), [])]
    for module, name in data.draw(st.permutations(remaining)):
        remove_hook(module, name)
    assert {id(m): (set(m.__dict__), m.__dict__.get("forward")) for m in modules} == before
    with torch.no_grad():
        assert torch.equal(model(x), original)
