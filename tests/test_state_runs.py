"""Run state: when a run starts, which branch a call is on without user code, what it records and prints."""

import copy
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import hookwise
from hookwise.core import attach_run_state, detach_run_state, get_run_state


class Denoiser(nn.Module):
    """Sampling happens in eval mode (a module starts in train mode, where caches do nothing)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, timestep):
        return self.lin(x)


class ListDenoiser(nn.Module):
    """A model whose main input is a list of latents, one per sample (timestep given as a tensor)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: list, timestep: torch.Tensor, context: torch.Tensor):
        return [self.lin(v) for v in x]


def test_back_to_back_one_step_runs_are_separate_runs():
    model = Denoiser().eval()
    state = attach_run_state(model).state
    for i in range(3):
        model(torch.randn(1, 2), 1.0)
        assert state.run == i and state.step == 0


def test_a_validation_loop_at_a_fixed_timestep_starts_a_run_per_call():
    model = Denoiser().eval()
    state = attach_run_state(model).state
    for i in range(3):
        with hookwise.branch(model, "cond"):
            model(torch.randn(1, 2), torch.tensor([0.5]))
            assert state.run == i and state.step == 0


def test_a_timestep_repeated_later_in_a_schedule_continues_the_run():
    model = Denoiser().eval()
    state = attach_run_state(model).state
    for t in (1.0, 0.5, 0.5, 0.25, 0.25):  # Heun-style: every later timestep twice, on new latents
        model(torch.randn(1, 2), t)
    assert state.run == 0 and state.step == 4


def test_cfg_as_two_calls_without_branches_is_told_apart_by_call_order():
    model = Denoiser().eval()
    state = attach_run_state(model).state
    seen = []
    x = torch.randn(1, 2)
    for t in (1.0, 0.5, 0.25):
        for _ in range(2):
            model(x, t)
            seen.append((state.branch, state.step))
        x = x - 0.1  # the next step's latents
    assert seen == [("default", 0), ("default.1", 0), ("default", 1), ("default.1", 1), ("default", 2), ("default.1", 2)]
    assert state.run == 0 and hookwise.core.state.auto_branch(1) == "default.1"


def test_equal_copies_of_the_latents_on_the_host_count_as_the_same_input():
    model = Denoiser().eval()
    state = attach_run_state(model).state
    x = torch.randn(1, 2)
    model(x.clone(), torch.tensor([1.0]))
    model(x.clone(), torch.tensor([1.0]))
    assert state.branch == "default.1" and state.run == 0


def test_latents_written_in_place_are_a_new_input_not_a_second_branch():
    model = Denoiser().eval()
    state = attach_run_state(model).state
    x = torch.randn(1, 2)
    model(x, 1.0)
    x.add_(1.0)  # a one-step sampler updating its latents in place, then run again
    model(x, 1.0)
    assert state.branch == "default" and state.run == 1


def test_explicit_branches_and_batched_cfg_keep_one_branch_per_name():
    model = Denoiser().eval()
    state = attach_run_state(model).state
    x = torch.randn(2, 2)
    for t in (1.0, 0.5):
        for name in ("cond", "uncond"):
            with hookwise.branch(model, name):
                model(x, t)
                assert state.branch == name
        model(x, t)  # batched: one call per step
    assert state.run == 0 and state.steps() == {"cond": 1, "uncond": 1, "default": 1}


def test_training_calls_keep_the_old_rules():
    """Training calls at random timesteps: no call-order branches, no new run on a repeated timestep."""
    model = Denoiser().train()
    state = attach_run_state(model).state
    x = torch.randn(1, 2)
    for _ in range(3):
        model(x, 0.5)
        assert state.branch == "default"
    assert state.run == 0 and state.step == 2
    model(x, 0.7)  # a rise still starts a new run, as before
    assert state.run == 1


def test_a_list_of_latents_is_not_recorded_as_latents_and_the_timestep_is_read(caplog):
    model = ListDenoiser().eval()
    state = attach_run_state(model).state
    x = [torch.randn(1, 2), torch.randn(1, 2)]
    context = torch.randn(2, 4)
    with caplog.at_level(logging.INFO, logger="hookwise"):
        model(x, torch.tensor([0.75, 0.75]), context)
        model(x, torch.tensor([0.75, 0.75]), context)  # CFG as two calls on the same list
    assert state.latents is None and state.timestep_value() == pytest.approx(0.75)
    assert state.cfg_halves_equal() is None
    assert state.branch == "default.1" and state.run == 0
    said = [r.getMessage() for r in caplog.records if "list of 2 tensors" in r.getMessage()]
    assert len(said) == 1 and "records no latents" in said[0]


def test_latents_are_the_main_input_not_the_first_tensor_argument():
    class TimestepFirst(nn.Module):
        def forward(self, timestep, hidden_states):
            return hidden_states

    model = TimestepFirst().eval()
    state = attach_run_state(model).state
    x = torch.randn(2, 3)
    model(torch.tensor([1.0, 1.0]), x)
    assert state.latents is x


def test_repr_shows_timestep_step_branch_run_and_mode():
    model = Denoiser().eval()
    state = attach_run_state(model).state
    with hookwise.branch(model, "uncond"):
        model(torch.randn(1, 2), torch.tensor([0.25]))
        inside = repr(state)
    after = repr(hookwise.get_run_state(model))
    assert inside == "RunState(timestep=0.25, step=0, branch='uncond', run=0, mode='eval', calls=1)"
    # after the block the branch is back to the default (that branch has not been called yet)
    assert after == "RunState(timestep=0.25, step=-1, branch='default', run=0, mode='eval', calls=1)"


def test_the_readme_run_state_lines_print_what_they_say(capsys):
    transformer = Denoiser().eval()
    hookwise.apply(transformer, hookwise.FasterCache(attention_range=None, uncond_range=2))
    uncond_inputs = dict(x=torch.randn(1, 2), timestep=999.0)
    with hookwise.branch(transformer, "uncond"):
        transformer(**uncond_inputs)
        print(hookwise.get_run_state(transformer))
    print(hookwise.get_run_state(transformer).branch)
    hookwise.remove(transformer)
    readme = open(Path(__file__).parent.parent / "README.md").read()
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["RunState(timestep=999.0, step=0, branch='uncond', run=0, mode='eval', calls=1)", "default"]
    assert f"# {printed[0]}" in readme and f"# '{printed[1]}'" in readme


# ---- diffusers' cache_context ------------------------------------------------------------------
def _tiny_flux():
    from model_helpers import tiny_flux

    return tiny_flux()


def test_diffusers_cache_context_sets_the_branch_and_comes_off_exactly():
    model, inputs = _tiny_flux()
    before = dict(model.__dict__)
    state = attach_run_state(model).state
    assert "cache_context" in model.__dict__
    seen = []
    for name in ("cond", "uncond"):
        with model.cache_context(name):
            model(**inputs)
            seen.append((state.branch, state.step))
    assert seen == [("cond", 0), ("uncond", 0)] and state.branch == "default"
    detach_run_state(model)
    assert "cache_context" not in model.__dict__ and "_hookwise_overrides" not in model.__dict__
    assert {k: v for k, v in model.__dict__.items() if k != "_diffusers_hook"}.keys() == before.keys()
    with model.cache_context("cond"):  # diffusers' own method again
        model(**inputs)


def test_diffusers_cache_context_still_reaches_diffusers_hooks():
    from diffusers.hooks import HookRegistry as DiffusersRegistry

    model, inputs = _tiny_flux()
    attach_run_state(model)
    with model.cache_context("cond"):
        registry = DiffusersRegistry.check_if_exists_or_initialize(model)
        assert registry is not None
        assert get_run_state(model).branch == "cond"


def test_a_deep_copy_of_a_hooked_diffusers_model_gets_its_own_branches_and_comes_off_exactly():
    model, inputs = _tiny_flux()
    attach_run_state(model)
    copied = copy.deepcopy(model)
    with copied.cache_context("uncond"):
        copied(**inputs)
        assert get_run_state(copied).branch == "uncond" and get_run_state(model).branch == "default"
    detach_run_state(copied)
    assert "cache_context" not in copied.__dict__ and "_hookwise_overrides" not in copied.__dict__
    with copied.cache_context("cond"):
        copied(**inputs)
