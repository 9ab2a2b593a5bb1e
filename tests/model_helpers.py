"""Small models for tests: diffusers' own tiny test configs, a musubi-style DiT, plain MLPs.

Each `tiny_<arch>()` returns (model, inputs) with a fixed seed; inputs are keyword arguments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hookwise.core.outputs import sample_of


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_flux(batch: int = 1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    g = _gen()
    h = w = 4
    seq = 24
    inputs = dict(
        hidden_states=torch.randn(batch, h * w, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, seq, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.randn(h * w, 3, generator=g),
        txt_ids=torch.randn(seq, 3, generator=g),
    )
    return model, inputs


def tiny_wan(batch: int = 1):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    g = _gen()
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 2, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 12, 16, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
    )
    return model, inputs


def tiny_hunyuanvideo(batch: int = 1):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()
    g = _gen()
    seq = 12
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 1, 16, 16, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g).float(),
        encoder_hidden_states=torch.randn(batch, seq, 16, generator=g),
        pooled_projections=torch.randn(batch, 8, generator=g),
        encoder_attention_mask=torch.ones(batch, seq),
        guidance=torch.randint(0, 1000, (batch,), generator=g).float(),
    )
    return model, inputs


def tiny_ltx(batch: int = 2):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        qk_norm="rms_norm_across_heads",
        caption_channels=16,
    ).eval()
    g = _gen()
    frames, h, w, seq = 2, 16, 16, 16
    inputs = dict(
        hidden_states=torch.randn(batch, frames * h * w, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, seq, 16, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
        encoder_attention_mask=torch.ones(batch, seq).bool(),
        num_frames=frames,
        height=h,
        width=w,
    )
    return model, inputs


def tiny_sd3(batch: int = 2):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=96,
        dual_attention_layers=(),
        qk_norm=None,
    ).eval()
    g = _gen()
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 32, 32, generator=g),
        encoder_hidden_states=torch.randn(batch, 154, 32, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        timestep=torch.randint(0, 1000, (batch,), generator=g),
    )
    return model, inputs


def tiny_qwenimage(batch: int = 1):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    g = _gen()
    h = w = 4
    inputs = dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
        encoder_hidden_states_mask=torch.ones(batch, 8, dtype=torch.long),
        timestep=torch.tensor([1.0]).expand(batch),
        img_shapes=[(1, h, w)] * batch,
    )
    return model, inputs


TINY_DIFFUSERS = {
    "flux": tiny_flux,
    "wan": tiny_wan,
    "hunyuanvideo": tiny_hunyuanvideo,
    "ltx-video": tiny_ltx,
    "sd3": tiny_sd3,
    "qwen-image": tiny_qwenimage,
}


# ---- a musubi-tuner style double/single-stream DiT ---------------------------------------------
class Modulation(nn.Module):
    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim * factor)
        self.factor = factor

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return self.lin(F.silu(vec)).chunk(self.factor, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.norm = nn.LayerNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = q.shape
    split = lambda t: t.view(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, -1, d)


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.img_mod = Modulation(dim, 6)
        self.txt_mod = Modulation(dim, 6)
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.img_attn = SelfAttention(dim, heads)
        self.txt_attn = SelfAttention(dim, heads)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.img_mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.heads = heads

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        img_in = self.img_norm1(img) * (1 + i_scale1[:, None]) + i_shift1[:, None]
        txt_in = self.txt_norm1(txt) * (1 + t_scale1[:, None]) + t_shift1[:, None]
        iq, ik, iv = self.img_attn.qkv(img_in).chunk(3, dim=-1)
        tq, tk, tv = self.txt_attn.qkv(txt_in).chunk(3, dim=-1)
        q, k, v = torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1)
        attn = _attend(q, k, v, self.heads)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + i_gate1[:, None] * self.img_attn.proj(i_attn)
        txt = txt + t_gate1[:, None] * self.txt_attn.proj(t_attn)
        img = img + i_gate2[:, None] * self.img_mlp(self.img_norm2(img) * (1 + i_scale2[:, None]) + i_shift2[:, None])
        txt = txt + t_gate2[:, None] * self.txt_mlp(self.txt_norm2(txt) * (1 + t_scale2[:, None]) + t_shift2[:, None])
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.modulation = Modulation(dim, 3)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear1 = nn.Linear(dim, dim * 3 + dim * 2)
        self.linear2 = nn.Linear(dim + dim * 2, dim)
        self.heads = heads
        self.dim = dim

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        h = self.pre_norm(x) * (1 + scale[:, None]) + shift[:, None]
        qkv, mlp = torch.split(self.linear1(h), [self.dim * 3, self.dim * 2], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        out = self.linear2(torch.cat([_attend(q, k, v, self.heads), F.gelu(mlp)], dim=-1))
        return x + gate[:, None] * out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * 1000 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MusubiDiT(nn.Module):
    """A FLUX-like DiT with musubi-tuner / reference-code naming (double_blocks, single_blocks, ...)."""

    def __init__(self, in_channels: int = 8, dim: int = 32, heads: int = 2, depth: int = 2, depth_single: int = 3,
                 txt_dim: int = 16, vec_dim: int = 12) -> None:
        super().__init__()
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_in = nn.Linear(txt_dim, dim)
        self.time_in = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.vector_in = nn.Sequential(nn.Linear(vec_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(dim, heads) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(dim, heads) for _ in range(depth_single)])
        self.final_layer = LastLayer(dim, in_channels)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        vec = self.time_in(timestep_embedding(timesteps, 64)) + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, txt.shape[1] :], vec)


def tiny_musubi(batch: int = 1):
    torch.manual_seed(0)
    model = MusubiDiT().eval()
    g = _gen()
    inputs = dict(
        img=torch.randn(batch, 16, 8, generator=g),
        txt=torch.randn(batch, 6, 16, generator=g),
        timesteps=torch.full((batch,), 0.7),
        y=torch.randn(batch, 12, generator=g),
    )
    return model, inputs


def mlp(width: int = 16, depth: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def output_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The main output tensor of a model call, for diffusers models and plain ones."""
    with torch.no_grad():
        return sample_of(model(**inputs), "output_of")
