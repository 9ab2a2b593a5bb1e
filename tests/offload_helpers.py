"""Helpers shared by the offloading tests: LoRA, forward + backward, strict mode, odd models."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hookwise.core.outputs import sample_of
from hookwise.memory.offload import _offloader
from model_helpers import MusubiDiT, timestep_embedding

LORA_TARGETS = ["to_q", "to_k", "to_v", "qkv", "proj", "linear1", "linear2"]


def add_lora(model: nn.Module, targets=LORA_TARGETS, r: int = 4) -> nn.Module:
    """Freeze `model` and inject LoRA adapters with random B (so every adapter gets a gradient)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(r=r, target_modules=list(targets), init_lora_weights=False), model)
    return model


def fwd_bwd(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every parameter gradient of one forward + backward of a squared-output loss."""
    model.zero_grad(set_to_none=True)
    out = sample_of(model(**inputs), "fwd_bwd")
    (out.float() ** 2).mean().backward()
    return out.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b) -> None:
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.equal(out_a, out_b), f"outputs differ by {(out_a - out_b).abs().max().item()}"
    assert grads_a.keys() == grads_b.keys(), sorted(set(grads_a) ^ set(grads_b))
    bad = [k for k in grads_a if not torch.equal(grads_a[k], grads_b[k])]
    assert not bad, f"gradients differ for {bad[:5]}"


def scheduler(model: nn.Module):
    """The offload scheduler of `model`, for tests of its decisions that no report shows: strict mode,
    the event trace, the transfer engine. Everything `offload_report` shows is read from it instead."""
    return _offloader(model).scheduler


def strict(model: nn.Module) -> None:
    """Unbound streamed tensors become empty: any use outside their group's hooks fails loudly."""
    scheduler(model).set_strict(True)


def uses(trace, backward: bool | None = None) -> list[str]:
    """Groups used, in order, consecutive repeats collapsed (backward unpacks one weight at a time)."""
    names = [name for kind, name, bw in trace if kind == "use" and (backward is None or bw == backward)]
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return x + torch.tanh(self.lin(self.norm(x)))


class Reordered(nn.Module):
    """Two towers called out of definition order: `second` (backwards) before `first`."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj_in = nn.Linear(width, width)
        self.first = nn.ModuleList([Block(width) for _ in range(depth)])
        self.second = nn.ModuleList([Block(width) for _ in range(depth)])
        self.proj_out = nn.Linear(width, width)

    def forward(self, x):
        x = self.proj_in(x)
        for block in reversed(self.second):
            x = block(x)
        for block in self.first:
            x = block(x)
        return self.proj_out(x)


class CheckpointedDiT(MusubiDiT):
    """The musubi-style DiT with gradient checkpointing per block, through the module call."""

    def __init__(self, reentrant: bool) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.reentrant = reentrant

    def forward(self, img, txt, timesteps, y):
        vec = self.time_in(timestep_embedding(timesteps, 64)) + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = checkpoint(block, img, txt, vec, use_reentrant=self.reentrant)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = checkpoint(block, x, vec, use_reentrant=self.reentrant)
        return self.final_layer(x[:, txt.shape[1] :], vec)
