import pytest
import torch
from torch import nn

import hookwise
from hookwise.core import RUN_STATE_HOOK, ModelHook, add_hook, attach_run_state, get_run_state, new_run
from hookwise.errors import ConfigError


class Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, timestep, scale=1.0):
        return self.lin(x) * scale


def test_default_branch_without_any_context_and_steps_count_calls():
    model = Denoiser()
    state = attach_run_state(model).state
    assert state.branch == "default" and state.step == -1
    for t in (999, 500, 1):
        model(torch.randn(1, 2), t)
    assert state.step == 2 and state.calls == 3 and state.run == 0


def test_timestep_is_read_by_name_from_kwargs_and_positional_args():
    model = Denoiser()
    state = attach_run_state(model).state
    model(torch.randn(1, 2), torch.tensor([0.25]))
    assert state.timestep_value() == pytest.approx(0.25)
    model(torch.randn(1, 2), timestep=torch.tensor([0.125]))
    assert state.timestep_value() == pytest.approx(0.125)


def test_timestep_argument_name_is_configurable_and_checked():
    class Musubi(nn.Module):
        def forward(self, img, sigma_level):
            return img

    hook = attach_run_state(Musubi(), timestep_arg="sigma_level")
    assert hook.timestep_arg == "sigma_level"
    with pytest.raises(ConfigError, match="not a parameter"):
        attach_run_state(Musubi(), timestep_arg="timestep")


def test_a_model_without_a_timestep_still_counts_steps():
    model = nn.Linear(2, 2)
    state = attach_run_state(model).state
    model(torch.randn(1, 2))
    assert state.timestep is None and state.step == 0


def test_branch_context_nests_and_restores_even_on_error():
    model = Denoiser()
    state = attach_run_state(model).state
    with hookwise.branch(model, "cond"):
        assert state.branch == "cond"
        with hookwise.branch(model, "uncond"):
            assert state.branch == "uncond"
        assert state.branch == "cond"
        with pytest.raises(RuntimeError):
            with hookwise.branch(model, "uncond"):
                raise RuntimeError("boom")
        assert state.branch == "cond"
    assert state.branch == "default"


def test_steps_are_counted_per_branch():
    model = Denoiser()
    state = attach_run_state(model).state
    seen = []
    for t in (1.0, 0.5):
        for name in ("cond", "uncond"):
            with hookwise.branch(model, name):
                model(torch.randn(1, 2), t)
                seen.append((name, state.step))
    assert seen == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)]


def test_a_rising_host_timestep_starts_a_new_run_and_resets_stateful_hooks():
    class Memory(ModelHook):
        stateful = True

        def __init__(self):
            self.seen = 0

        def pre_forward(self, module, args, kwargs):
            self.seen += 1
            return args, kwargs

        def reset(self):
            self.seen = 0

    model = Denoiser()
    state = attach_run_state(model).state
    memory = Memory()
    add_hook(model.lin, memory, "memory")
    for t in (1.0, 0.5, 0.1):
        model(torch.randn(1, 2), torch.tensor([t]))
    assert memory.seen == 3 and state.run == 0 and state.step == 2
    model(torch.randn(1, 2), torch.tensor([1.0]))  # a new sampling run starts from the top
    assert state.run == 1 and state.step == 0 and memory.seen == 1
    new_run(model)
    assert state.run == 2 and memory.seen == 0 and state.step == -1


def test_mode_records_train_and_eval():
    model = Denoiser()
    state = attach_run_state(model).state
    model.train()
    model(torch.randn(1, 2), 1.0)
    assert state.mode == "train" and state.grad_enabled
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 2), 1.0)
    assert state.mode == "eval" and not state.grad_enabled


def test_branch_on_a_model_hookwise_never_touched_just_runs():
    model = Denoiser()
    with hookwise.branch(model, "uncond") as state:
        assert state.branch == "uncond"
        model(torch.randn(1, 2), 1.0)
    assert get_run_state(model) is None
    assert "forward" not in model.__dict__


def test_branch_rejects_a_bad_name():
    with pytest.raises(ConfigError, match="non-empty string"):
        with hookwise.branch(Denoiser(), ""):
            pass


def test_run_state_hook_is_outermost():
    log = []

    class Late(ModelHook):
        layer = 900

        def pre_forward(self, module, args, kwargs):
            log.append(get_run_state(module).calls)
            return args, kwargs

    model = Denoiser()
    add_hook(model, Late(), "late")
    attach_run_state(model)
    model(torch.randn(1, 2), 1.0)
    assert log == [1]  # the run state had already recorded this call
    assert hookwise.HookRegistry.of(model).names()[0] == RUN_STATE_HOOK
