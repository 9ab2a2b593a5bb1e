"""Checkpointing: block activations recomputed in backward, gradients equal to the plain model's."""

import pytest
import torch

import hookwise
from hookwise.core import list_hooks
from hookwise.memory import saved_for_backward
from model_helpers import tiny_flux, tiny_wan
from offload_helpers import add_lora, assert_same, fwd_bwd

BUILDERS = {"flux": tiny_flux, "wan": tiny_wan}


@pytest.mark.parametrize("arch", ["flux", "wan"])
@pytest.mark.parametrize("offload_activations", [False, True])
def test_lora_gradients_equal_plain_with_tuple_outputs_and_kwargs(arch, offload_activations):
    model, inputs = BUILDERS[arch]()
    add_lora(model, ["to_q", "to_k", "to_v"])
    expected = fwd_bwd(model, inputs)
    hookwise.apply(model, hookwise.Checkpointing(offload_activations=offload_activations))
    report = hookwise.checkpointing_report(model)
    assert report.checkpointed == report.blocks and report.blocks
    assert_same(fwd_bwd(model, inputs), expected)
    report = hookwise.checkpointing_report(model)
    assert all(n == 1 for n in report.calls.values())
    if offload_activations:  # the block inputs went through the host saver and came back for backward
        assert report.host_packed > 0 and report.host_unpacked == report.host_packed
    else:
        assert report.host_packed == 0


def test_saved_bytes_drop_and_inference_is_unaffected():
    model, inputs = tiny_wan()
    model.requires_grad_(True)

    def loss():
        return model(**inputs).sample.float().pow(2).mean()

    plain = saved_for_backward(model, loss).new_bytes
    with torch.no_grad():
        expected = model(**inputs).sample
    hookwise.apply(model, hookwise.Checkpointing())
    assert saved_for_backward(model, loss).new_bytes < plain
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)


def test_blocks_int_takes_the_first_blocks_and_remove_restores():
    model, inputs = tiny_wan()
    before = {p: set(vars(m)) for p, m in model.named_modules()}
    hookwise.apply(model, hookwise.Checkpointing(blocks=1))
    report = hookwise.checkpointing_report(model)
    assert report.checkpointed == report.blocks[:1]
    hookwise.remove(model)
    assert list_hooks(model) == {}
    assert {p: set(vars(m)) for p, m in model.named_modules()} == before


def test_bad_configs_raise():
    with pytest.raises(hookwise.ConfigError):
        hookwise.Checkpointing(blocks=-1)
    for budget in ("8 parsecs", -1, True, [1]):
        with pytest.raises(hookwise.ConfigError):
            hookwise.Checkpointing(budget=budget)
    with pytest.raises(hookwise.ConfigError, match="count and a budget"):
        hookwise.Checkpointing(blocks=2, budget="8GB")
    assert hookwise.Checkpointing.from_dict(hookwise.Checkpointing(budget="8GiB").to_dict()).budget == "8GiB"
    model, _ = tiny_wan()
    with pytest.raises(hookwise.NoTargetError):
        hookwise.apply(model, hookwise.Checkpointing(blocks=["nope"]))


@pytest.mark.parametrize("offload_device", ["cpu", "disk"])
def test_composes_with_block_offload_gradients_exact(offload_device, tmp_path):
    model, inputs = tiny_wan()
    add_lora(model, ["to_q", "to_k", "to_v"])
    expected = fwd_bwd(model, inputs)
    config = hookwise.Offload(onload_device="cpu", offload_device=offload_device, granularity="block")
    if offload_device == "disk":
        config = config.replace(disk_path=str(tmp_path))
    hookwise.apply(model, config, hookwise.Checkpointing())
    for _ in range(2):
        assert_same(fwd_bwd(model, inputs), expected)
    hookwise.remove(model)
    assert list_hooks(model) == {}


def test_composes_with_fp8_casting_within_tolerance():
    model, inputs = tiny_wan()
    add_lora(model, ["to_q", "to_k", "to_v"])
    hookwise.apply(model, hookwise.LayerwiseCasting(storage_dtype=torch.float8_e4m3fn))
    expected_out, expected = fwd_bwd(model, inputs)
    hookwise.apply(model, hookwise.Checkpointing())
    out, grads = fwd_bwd(model, inputs)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-6)


class _Odd(torch.nn.Module):
    """Blocks in containers nested in containers; one block called twice, one listed module never called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
        blocks = torch.nn.ModuleList(make() for _ in range(2))
        self.stages = torch.nn.ModuleList([torch.nn.ModuleDict({"blocks": blocks, "spare": make()})])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.stages[0]["blocks"]
        x = x + blocks[0](x)
        x = x + blocks[0](x)  # called twice
        return x + blocks[1](x)  # stages.0.spare is never called


def _odd_step(model, x):
    """One forward + backward of the odd model: its output and every gradient."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_model_of_an_odd_shape_keeps_exact_gradients():
    model = _Odd()
    x = torch.randn(2, 4, 8)
    paths = ["stages.0.blocks.0", "stages.0.blocks.1", "stages.0.spare"]

    expected = _odd_step(model, x)
    hookwise.apply(model, hookwise.Checkpointing(blocks=paths))
    assert_same(_odd_step(model, x), expected)
    assert hookwise.checkpointing_report(model).calls == {paths[0]: 2, paths[1]: 1, paths[2]: 0}
    hookwise.remove(model)
    assert list_hooks(model) == {}


# ---- budget: blocks chosen from measured saved-for-backward bytes --------------------------------------
@pytest.mark.parametrize("arch", ["flux", "wan"])
def test_budget_measures_then_keeps_activations_where_they_fit_gradients_exact(arch):
    model, inputs = BUILDERS[arch]()
    add_lora(model, ["to_q", "to_k", "to_v"])
    expected = fwd_bwd(model, inputs)
    hookwise.apply(model, hookwise.Checkpointing(budget="1GB"))
    report = hookwise.checkpointing_report(model)
    assert report.budget == 10**9 and report.budget_met is None and report.checkpointed == report.blocks
    assert_same(fwd_bwd(model, inputs), expected)  # the measuring step checkpoints every block
    report = hookwise.checkpointing_report(model)
    assert report.budget_met and report.checkpointed == [] and set(report.measured) == set(report.blocks)
    assert all(m.saved_bytes > 0 and m.input_bytes > 0 and m.flops > 0 and m.calls == 1 for m in report.measured.values())
    assert_same(fwd_bwd(model, inputs), expected)  # then nothing is checkpointed: 1 GB holds it all
    assert hookwise.checkpointing_report(model).calls == {p: 1 for p in report.blocks}


def test_a_budget_for_one_block_keeps_exactly_that_one_and_the_rest_recompute():
    model, inputs = tiny_wan()
    add_lora(model, ["to_q", "to_k", "to_v"])
    expected = fwd_bwd(model, inputs)
    hookwise.apply(model, hookwise.Checkpointing(budget="1GB"))
    fwd_bwd(model, inputs)
    measured = hookwise.checkpointing_report(model).measured
    hookwise.remove(model)
    inputs_bytes = sum(m.input_bytes for m in measured.values())
    smallest = min(measured, key=lambda p: measured[p].saved_bytes)
    hookwise.apply(model, hookwise.Checkpointing(budget=inputs_bytes + measured[smallest].saved_bytes))
    for _ in range(3):
        assert_same(fwd_bwd(model, inputs), expected)
    report = hookwise.checkpointing_report(model)
    assert report.budget_met and report.checkpointed == [p for p in report.blocks if p != smallest]
    assert str(report.budget) in report.reason and "1 of 2" in report.reason
    # the blocks kept really keep their activations and the others do not: less is saved than all checkpointed
    model.requires_grad_(True)

    def loss():
        return model(**inputs).sample.float().pow(2).mean()

    budgeted = saved_for_backward(model, loss).new_bytes
    hookwise.remove(model)
    hookwise.apply(model, hookwise.Checkpointing())
    full = saved_for_backward(model, loss).new_bytes
    hookwise.remove(model)
    plain = saved_for_backward(model, loss).new_bytes
    assert full < budgeted < plain


def test_a_budget_below_the_inputs_is_stated_and_every_block_stays_checkpointed():
    model, inputs = tiny_wan()
    add_lora(model, ["to_q", "to_k", "to_v"])
    expected = fwd_bwd(model, inputs)
    hookwise.apply(model, hookwise.Checkpointing(budget=0))
    with pytest.warns(UserWarning, match="below the .* block inputs"):
        assert_same(fwd_bwd(model, inputs), expected)
    report = hookwise.checkpointing_report(model)
    assert report.budget_met is False and report.checkpointed == report.blocks and "not met" in report.reason
    # keeping the inputs on the host leaves nothing on the device: the same budget is met
    hookwise.remove(model)
    hookwise.apply(model, hookwise.Checkpointing(budget=0, offload_activations=True))
    assert_same(fwd_bwd(model, inputs), expected)
    assert hookwise.checkpointing_report(model).budget_met


def test_measured_block_bytes_equal_the_meter_of_the_plain_block():
    from offload_helpers import Block

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block(16) for _ in range(3)))
    x = torch.randn(4, 8, 16, requires_grad=True)
    hookwise.apply(model, hookwise.Checkpointing(blocks=["0", "1", "2"], budget="1GB"))
    model(x).sum().backward()
    measured = hookwise.checkpointing_report(model).measured
    hookwise.remove(model)
    for i, block in enumerate(model):
        h = model[:i](x).detach().requires_grad_(True)
        plain = saved_for_backward(block, lambda: block(h).sum())
        saved_input = h.untyped_storage().nbytes()  # LayerNorm saves the input: the checkpoint keeps it anyway
        assert measured[str(i)].saved_bytes == plain.new_bytes - saved_input
        assert measured[str(i)].input_bytes == h.untyped_storage().nbytes()


def test_budget_on_an_odd_model_counts_both_calls_of_a_reused_block_and_keeps_the_uncalled_one_listed():
    model = _Odd()
    x = torch.randn(2, 4, 8)
    paths = ["stages.0.blocks.0", "stages.0.blocks.1", "stages.0.spare"]

    expected = _odd_step(model, x)
    hookwise.apply(model, hookwise.Checkpointing(blocks=paths, budget="1MB"))
    assert_same(_odd_step(model, x), expected)
    report = hookwise.checkpointing_report(model)
    assert report.measured[paths[0]].calls == 2 and report.measured[paths[1]].calls == 1
    assert report.measured[paths[2]].calls == 0 and "never called" in report.reason
    assert report.checkpointed == [paths[2]]
    assert_same(_odd_step(model, x), expected)
    hookwise.remove(model)
    assert list_hooks(model) == {}


# ---- the planner enumerates checkpointing for training jobs ----------------------------------------------
@pytest.fixture(scope="module")
def flux_spec():
    from hookwise.introspect import build_spec
    from hookwise.plan.estimate import formula_activation
    from hookwise.plan.footprint import hidden_size, measure

    model = build_spec("flux.1-dev")
    target = measure(model)
    model_map = target.denoiser.model_map

    def estimator(m, job, **kw):
        return formula_activation(model_map, job, hidden_size(model_map))

    return model, target, estimator


def _plan(flux_spec, job, vram_gb):
    from hookwise.plan import Hardware, make_plan

    model, target, estimator = flux_spec
    hardware = Hardware.detect(vram=f"{vram_gb}GB", ram="256GB", h2d="25GB/s", disk_read="2GB/s", tflops=130, probe=False)
    return make_plan(model, job, hardware, activation_estimator=estimator, target=target)


def _checkpointing(option):
    return [c for c in option.configs if isinstance(c, hookwise.Checkpointing)]


def test_planner_checkpoints_a_training_job_on_a_small_device_and_not_on_a_large_one(flux_spec):
    from hookwise.plan import Job

    job = Job(height=512, width=512, training=True, checkpointing=False)  # the trainer does not checkpoint
    large = _plan(flux_spec, job, 141)
    assert large.chosen is not None and not _checkpointing(large.chosen), large.explain()
    small = _plan(flux_spec, job, 16)  # 17 GiB of activations alone do not fit
    assert small.chosen is not None and _checkpointing(small.chosen), small.explain()
    assert small.chosen.activation_bytes < large.chosen.activation_bytes
    assert small.chosen.device_peak <= 0.95 * 16e9 - 512 * 2**20
    # every option the planner offers: 0 / 50 / 100% of the blocks, and a budget in between
    offered = {c for o in small.options for c in _checkpointing(o)}
    assert any(c.blocks == "auto" and c.budget is None for c in offered)
    assert any(isinstance(c.blocks, int) and c.blocks == 57 // 2 for c in offered)
    plain = next(o for o in small.options if o.label == "all resident")
    full = next(o for o in small.options if o.label == "checkpointing")
    half = next(o for o in small.options if o.label == f"checkpointing(blocks={57 // 2})")
    assert full.activation_bytes < half.activation_bytes < plain.activation_bytes
    assert plain.time_rel < half.time_rel < full.time_rel  # recompute costs time
    # a job that checkpoints by itself (the default for training) is planned as before: no option added
    default = _plan(flux_spec, Job(height=512, width=512, training=True), 24)
    assert not any(_checkpointing(o) for o in default.options)
