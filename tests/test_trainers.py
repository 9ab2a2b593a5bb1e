"""Trainers' own models and LoRA networks (kohya / musubi style) under casting and offloading.

The LoRA network here is written the way kohya's and musubi-tuner's are: a network module outside
the model holding one `LoRAModule` per targeted Linear, each keeping `org_forward` (the Linear's
forward at the time it was applied) and replacing the Linear's `forward` on the instance. The
model's blocks checkpoint their own computation (`checkpoint(self._forward, ...)`), so the
recompute in backward runs outside the block's call.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import hookwise
from hookwise.core import HookRegistry, list_hooks
from hookwise.memory import LayerwiseCasting, Offload
from hookwise.memory.casting import cast_leaves
from offload_helpers import strict

TARGETS = ("qkv", "proj", "fc1", "fc2")


# ---- a kohya-style LoRA network ----------------------------------------------------------------------
class LoRAModule(nn.Module):
    """One adapter: `org_module.forward` becomes this module's forward, which calls the original."""

    def __init__(self, name: str, org_module: nn.Linear, rank: int = 4, alpha: float = 2.0) -> None:
        super().__init__()
        self.lora_name = name
        self.lora_down = nn.Linear(org_module.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        # kohya starts lora_up at zero; random here so every LoRA parameter gets a gradient at once.
        nn.init.normal_(self.lora_up.weight, std=0.1)
        self.scale = alpha / rank
        self.multiplier = 1.0
        self.org_module = org_module

    def apply_to(self) -> None:
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward
        del self.org_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        org_forwarded = self.org_forward(x)
        lx = self.lora_up(self.lora_down(x))
        return org_forwarded + lx * self.multiplier * self.scale


class LoRANetwork(nn.Module):
    """The adapters of every targeted Linear inside the model's blocks; not a child of the model."""

    def __init__(self, model: nn.Module, targets: tuple[str, ...] = TARGETS) -> None:
        super().__init__()
        torch.manual_seed(7)
        loras = []
        for path, module in model.named_modules():
            if isinstance(module, nn.Linear) and path.startswith("blocks.") and path.rsplit(".", 1)[-1] in targets:
                loras.append(LoRAModule("lora_" + path.replace(".", "_"), module))
        self.loras = nn.ModuleList(loras)

    def apply_to(self) -> None:
        for lora in self.loras:
            lora.apply_to()


# ---- a model whose blocks checkpoint their own computation ---------------------------------------------
class CheckpointingBlock(nn.Module):
    def __init__(self, width: int, reentrant: bool | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        # Read inline by `_forward` before any child runs (musubi's modulation tables are).
        self.modulation = nn.Parameter(torch.randn(2, width) * 0.1)
        self.reentrant = reentrant  # None: no checkpointing

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation.unbind(0)
        h = self.norm1(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is not None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=self.reentrant)
        return self._forward(x)


class TrainerDiT(nn.Module):
    def __init__(self, width: int = 16, depth: int = 4, reentrant: bool | None = None) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(8, width)
        self.blocks = nn.ModuleList(CheckpointingBlock(width, reentrant) for _ in range(depth))
        self.final_layer = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x)
        for block in self.blocks:
            h = block(h)
        return self.final_layer(h)


def trainer_model(reentrant: bool | None = None) -> tuple[TrainerDiT, torch.Tensor]:
    torch.manual_seed(0)
    model = TrainerDiT(reentrant=reentrant).requires_grad_(False)
    # A reentrant checkpoint needs an input that requires grad to give the LoRA gradients.
    x = torch.randn(2, 6, 8, requires_grad=reentrant is True)
    return model, x


def cast_with_lora(model: nn.Module, network: LoRANetwork, order: str) -> None:
    """Cast `model` and add the LoRA network, in the order named."""
    if order == "lora_then_casting":
        network.apply_to()
        hookwise.apply(model, CASTING)
    else:
        hookwise.apply(model, CASTING)
        network.apply_to()


def lora_step(model: nn.Module, network: LoRANetwork, x: torch.Tensor):
    """Output and the gradient of every LoRA parameter after one forward + backward."""
    network.zero_grad(set_to_none=True)
    out = model(x)
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad for n, p in network.named_parameters()}
    return out.detach(), grads


def assert_every_lora_gradient(grads: dict) -> None:
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or not g.abs().sum()]
    assert not missing, f"{len(missing)} of {len(grads)} LoRA parameters got no usable gradient: {missing[:4]}"


def assert_close_grads(grads: dict, expected: dict, rtol: float, atol: float) -> None:
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a cast model with every cast weight replaced by its compute-dtype values."""
    leaves = cast_leaves(model)
    modules = dict(model.named_modules())
    weights = {path: hook.dequantized(modules[path]) for path, hook in leaves.items()}
    plain = TrainerDiT(reentrant=model.blocks[0].reentrant).requires_grad_(False)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("weight_scale")}
    for path, weight in weights.items():
        state[f"{path}.weight"] = weight
    plain.load_state_dict(state)
    return plain


CASTING = LayerwiseCasting(storage_dtype=torch.float8_e4m3fn, scaling="channel")


# ---- LoRA networks that replace a Linear's forward, under layerwise casting ---------------------------
@pytest.mark.parametrize("order", ["lora_then_casting", "casting_then_lora"])
def test_casting_runs_a_lora_forward_set_on_the_instance(order):
    model, x = trainer_model()
    reference = copy.deepcopy(model)
    reference_net = LoRANetwork(reference)
    reference_net.apply_to()
    _, uncast = lora_step(reference, reference_net, x)

    network = LoRANetwork(model)
    cast_with_lora(model, network, order)
    assert len(cast_leaves(model)) == len(network.loras)
    out, grads = lora_step(model, network, x)
    assert_every_lora_gradient(grads)
    # Within casting tolerance of the uncast model ...
    assert_close_grads(grads, uncast, rtol=0.1, atol=2e-3)
    # ... and equal (up to float rounding) to a plain model holding the dequantized weights.
    plain = dequantized_copy(model)
    plain_net = LoRANetwork(plain)
    plain_net.apply_to()
    plain_net.load_state_dict(network.state_dict())
    plain_out, exact = lora_step(plain, plain_net, x)
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, exact, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("order", ["lora_then_casting", "casting_then_lora"])
def test_remove_casting_keeps_the_lora_forward_the_instance_has(order):
    model, x = trainer_model()
    network = LoRANetwork(model)
    cast_with_lora(model, network, order)
    lora_step(model, network, x)
    with pytest.warns(UserWarning, match="storage rounding"):
        hookwise.remove(model)
    assert list_hooks(model) == {}
    modules = dict(model.named_modules())
    for lora in network.loras:
        linear = modules[lora.lora_name.removeprefix("lora_").replace("_", ".")]
        assert HookRegistry.of(linear) is None
        assert linear.__dict__["forward"] == lora.forward  # the LoRA forward stays
        assert linear.weight.dtype == torch.float32 and "weight_scale" not in linear._buffers
    # The model computes Linear + LoRA with the restored weights, and the LoRA still trains.
    plain = copy.deepcopy(model)
    for path, module in plain.named_modules():
        module.__dict__.pop("forward", None)
    plain_net = LoRANetwork(plain)
    plain_net.apply_to()
    plain_net.load_state_dict(network.state_dict())
    out, grads = lora_step(model, network, x)
    plain_out, expected = lora_step(plain, plain_net, x)
    assert_every_lora_gradient(grads)
    assert torch.equal(out, plain_out)
    assert_close_grads(grads, expected, rtol=0, atol=0)
    # And casting applies again over the LoRA forward the model now has.
    hookwise.apply(model, CASTING)
    assert_every_lora_gradient(lora_step(model, network, x)[1])


def test_casting_refuses_an_instance_forward_that_never_computes_its_linear():
    model, x = trainer_model()
    linear = model.blocks[0].fc1
    linear.forward = lambda inp: inp.matmul(linear.weight.t().to(inp.dtype))  # reads the weight itself
    hookwise.apply(model, CASTING)
    with pytest.raises(hookwise.errors.HookwiseError, match="blocks.0.fc1.*skip_patterns"):
        model(x)


# ---- gradient checkpointing inside blocks, under offloading --------------------------------------------
def offload_config(offload_device: str, granularity: str, tmp_path) -> Offload:
    if offload_device == "disk":
        return Offload(onload_device="cpu", offload_device="disk", disk_path=str(tmp_path), granularity=granularity)
    return Offload(onload_device="cpu", offload_device="cpu", granularity=granularity)


@pytest.mark.parametrize("offload_device", ["cpu", "disk"])
@pytest.mark.parametrize("granularity", ["block", "leaf"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_offload_loads_weights_for_a_recompute_outside_the_block_call(reentrant, granularity, offload_device, tmp_path):
    model, x = trainer_model(reentrant)
    network = LoRANetwork(model)
    network.apply_to()
    expected_out, expected = lora_step(model, network, x)
    hookwise.apply(model, offload_config(offload_device, granularity, tmp_path))
    strict(model)  # an unbound streamed weight is NaN: a recompute reading one shows it
    for _ in range(3):  # the first pass records the order, later ones prefetch along it
        out, grads = lora_step(model, network, x)
        assert_every_lora_gradient(grads)
        assert torch.equal(out, expected_out)
        assert_close_grads(grads, expected, rtol=0, atol=0)
    hookwise.remove(model)
    assert list_hooks(model) == {}


@pytest.mark.parametrize("order", ["lora_then_casting", "casting_then_lora"])
def test_cast_offloaded_checkpointing_model_trains_a_lora_network(order, tmp_path):
    model, x = trainer_model(reentrant=False)
    network = LoRANetwork(model)
    cast_with_lora(model, network, order)
    expected_out, expected = lora_step(model, network, x)
    hookwise.apply(model, offload_config("cpu", "block", tmp_path))
    strict(model)
    for _ in range(2):
        out, grads = lora_step(model, network, x)
        assert_every_lora_gradient(grads)
        assert torch.equal(out, expected_out)
        assert_close_grads(grads, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("offload_device", ["cpu", "disk"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_cuda_block_offload_loads_weights_for_a_recompute_outside_the_block_call(reentrant, offload_device, tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    resident, x = trainer_model(reentrant)
    x = x.detach().cuda().requires_grad_(reentrant is True)
    resident_net = LoRANetwork(resident.cuda())
    resident_net.apply_to()
    model, _ = trainer_model(reentrant)
    network = LoRANetwork(model)
    network.apply_to()
    network.cuda()
    with sdpa_kernel(SDPBackend.MATH):  # bitwise reproducible, so "equal" can mean equal
        expected_out, expected = lora_step(resident, resident_net, x)
        config = Offload(onload_device="cuda", offload_device=offload_device, granularity="block")
        if offload_device == "disk":
            config = config.replace(disk_path=str(tmp_path))
        hookwise.apply(model, config)
        for _ in range(3):
            out, grads = lora_step(model, network, x)
            assert torch.equal(out, expected_out)
            assert_close_grads(grads, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cast, remove", [(False, "all"), (False, "offload"), (True, "all"), (True, "offload"), (True, "casting")]
)
def test_a_lora_added_after_leaf_offloading_survives_removing_any_part(cast, remove):
    """The adapters wrap hookwise's leaf forwards; removing any part of the stack keeps them, working."""
    model, x = trainer_model()
    configs = [Offload(onload_device="cpu", granularity="leaf")] + ([CASTING] if cast else [])
    hookwise.apply(model, *configs)
    network = LoRANetwork(model)
    network.apply_to()
    before, _ = lora_step(model, network, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # casting's "storage rounding stays"
        hookwise.remove(model, *(() if remove == "all" else (remove,)))
    left = {"all": [], "offload": [CASTING] if cast else [], "casting": [configs[0]]}[remove]
    assert list(hookwise.applied(model)) == left
    if remove != "casting":  # else offloading was applied again, over the LoRA forward
        modules = dict(model.named_modules())
        for lora in network.loras:
            linear = modules[lora.lora_name.removeprefix("lora_").replace("_", ".")]
            assert linear.__dict__["forward"] == lora.forward  # the LoRA forward stays
    after, grads = lora_step(model, network, x)
    assert torch.equal(after, before)  # the LoRA still computes
    assert_every_lora_gradient(grads)
