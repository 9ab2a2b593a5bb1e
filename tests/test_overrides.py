"""Reversible per-instance method overrides (core.overrides)."""

import copy

import pytest
from torch import nn

from hookwise.core import transaction
from hookwise.core.overrides import overridden, override_method, restore_method
from hookwise.errors import HookError


def test_override_and_restore_an_instance_method_exactly():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    override_method(a, "extra_repr", lambda self: "patched", owner="test")
    assert repr(a) == "Linear(patched)" and repr(b) != "Linear(patched)"  # the class is untouched
    assert overridden(a) == {"extra_repr": "test"}
    with pytest.raises(HookError, match="already overridden by 'test'"):
        override_method(a, "extra_repr", lambda self: "again", owner="other")
    with pytest.raises(HookError, match="no override by 'other'"):
        restore_method(a, "extra_repr", owner="other")
    restore_method(a, "extra_repr", owner="test")
    assert "extra_repr" not in a.__dict__ and overridden(a) == {}


def test_a_previous_instance_attribute_comes_back_and_rollback_undoes():
    m = nn.Linear(2, 2)
    marker = lambda: "instance"  # noqa: E731
    m.__dict__["extra_repr"] = marker
    override_method(m, "extra_repr", lambda self: "patched", owner="t")
    restore_method(m, "extra_repr", owner="t")
    assert m.__dict__["extra_repr"] is marker

    n = nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        with transaction():
            override_method(n, "extra_repr", lambda self: "patched", owner="t")
            raise RuntimeError("boom")
    assert "extra_repr" not in n.__dict__ and overridden(n) == {}


def test_restoring_on_a_deep_copy_leaves_no_instance_attribute():
    m = nn.Linear(2, 2)
    override_method(m, "extra_repr", _patched_repr, owner="t")
    c = copy.deepcopy(m)
    assert repr(c) == "Linear(patched)"
    restore_method(c, "extra_repr", owner="t")
    assert "extra_repr" not in c.__dict__ and repr(c) == "Linear(in_features=2, out_features=2, bias=True)"


def _patched_repr(self):
    return "patched"
