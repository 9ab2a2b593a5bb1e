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
    with pytest.raises(hookwise.ConfigError):
        hookwise.Checkpointing(budget="8GB")
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


def test_a_model_of_an_odd_shape_keeps_exact_gradients():
    model = _Odd()
    x = torch.randn(2, 4, 8)
    paths = ["stages.0.blocks.0", "stages.0.blocks.1", "stages.0.spare"]

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = step()
    hookwise.apply(model, hookwise.Checkpointing(blocks=paths))
    assert_same(step(), expected)
    assert hookwise.checkpointing_report(model).calls == {paths[0]: 2, paths[1]: 1, paths[2]: 0}
    hookwise.remove(model)
    assert list_hooks(model) == {}
