"""Run state with a timestep that lives on an accelerator: read lazily, at most once per call.

CPU tests cannot make a CUDA tensor, so `_host_float` is patched to treat every tensor as
device-resident (the rise check then goes through the pending path exactly as on a GPU).
"""

import pytest
import torch
from torch import nn

import hookwise.core.state as state_mod
from hookwise.core import attach_run_state


class Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, hidden_states, timestep):
        return self.lin(hidden_states)


@pytest.fixture
def device_timesteps(monkeypatch):
    real = state_mod._host_float
    monkeypatch.setattr(state_mod, "_host_float", lambda v: None if isinstance(v, torch.Tensor) else real(v))


def test_a_device_timestep_is_pending_until_read_and_then_detects_a_new_run(device_timesteps):
    model = Denoiser()
    state = attach_run_state(model).state
    resets = []
    state.on_new_run(lambda: resets.append(state.run))
    for t in (0.9, 0.5):
        model(torch.randn(1, 2), torch.tensor([t]))
        assert state.pending_timestep() is not None  # nothing read it yet
        assert state.resolve_timestep() == pytest.approx(t)
        assert state.pending_timestep() is None
    model(torch.randn(1, 2), torch.tensor([0.95]))
    assert state.step == 2 and state.run == 0  # counted on optimistically until read
    assert state.resolve_timestep(0.95) == pytest.approx(0.95)  # a caller's own read, folded in
    assert state.run == 1 and state.step == 0 and resets == [1]


def test_an_unread_device_timestep_never_costs_a_read(device_timesteps, monkeypatch):
    model = Denoiser()
    state = attach_run_state(model).state
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: reads.append(1) or real_float(self))
    for t in (0.9, 0.5, 0.1):
        model(torch.randn(1, 2), torch.tensor([t]))
    assert reads == [] and state.step == 2
    assert state.timestep_value() == pytest.approx(0.1) and reads == [1]


def test_cfg_halves_probe_and_latents_are_recorded():
    model = Denoiser()
    state = attach_run_state(model).state
    x = torch.randn(1, 2)
    model(hidden_states=torch.cat([x, x]), timestep=0.5)
    assert state.latents.shape == (2, 2) and bool(state.cfg_halves_equal())
    model(hidden_states=torch.randn(2, 2), timestep=0.4)
    assert not bool(state.cfg_halves_equal())
    model(hidden_states=torch.randn(3, 2), timestep=0.3)
    assert state.cfg_halves_equal() is None
