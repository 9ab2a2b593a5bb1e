"""Context parallelism on spawned gloo ranks: Ulysses, ring and both give the single-process output, on
tiny Flux, Wan, LTX-Video, Qwen-Image, SD3, HunyuanVideo and custom DiTs (one with a text padding mask),
and ring steps run on the applied attention backend.

Spawning costs seconds (each rank imports torch and diffusers), so each world size is spawned once
for every parallel test module (`dist_helpers.share_ranks`) and every rank runs all the cases of that
world, returning each case's error against the single-process model, which every rank also computes itself.
"""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import hookwise
from hookwise.parallel import context_parallel_stats

from cache_helpers import build, denoise
from dist_helpers import share_ranks, shared_results, world_of_one
from model_helpers import TINY_DIFFUSERS

TOL = 2e-5  # relative to the output's largest magnitude: fp32 reassociation only

CASES_2 = [(m, u, r, uneven) for m in ("flux", "wan", "musubi") for (u, r) in ((2, 1), (1, 2)) for uneven in (False, True)]
CASES_4 = [(m, u, r, uneven) for m in ("flux", "wan", "musubi") for (u, r) in ((4, 1), (1, 4), (2, 2)) for uneven in (False, True)]


def _uneven(name: str, inputs: dict) -> dict:
    """Token counts no world size here divides: image and text streams one or more tokens short."""
    g = torch.Generator().manual_seed(1)
    out = dict(inputs)
    if name == "flux":
        out["hidden_states"] = torch.randn(1, 15, 4, generator=g)
        out["img_ids"] = torch.randn(15, 3, generator=g)
        out["encoder_hidden_states"] = torch.randn(1, 23, 32, generator=g)
        out["txt_ids"] = torch.randn(23, 3, generator=g)
    elif name == "wan":
        out["hidden_states"] = torch.randn(1, 4, 1, 10, 14, generator=g)  # 1 x 5 x 7 = 35 tokens
        out["encoder_hidden_states"] = torch.randn(1, 11, 16, generator=g)
    else:
        out["img"] = torch.randn(1, 13, 8, generator=g)
        out["txt"] = torch.randn(1, 5, 16, generator=g)
    return out


def _output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _run_cases(rank, world, cases):
    results = {}
    for name, u, r, uneven in cases:
        model, inputs = build(name)
        if uneven:
            inputs = _uneven(name, inputs)
        want = _output(model, inputs)
        hookwise.apply(model, hookwise.ContextParallel(ulysses=u, ring=r))
        got = _output(model, inputs)
        stats = context_parallel_stats(model)
        hookwise.remove(model)
        results[(name, u, r, uneven)] = (_error(got, want), stats)
    return results


def _run_cache(rank, world):
    """A first-block cache on musubi: its decisions under CP are the single process's, on every rank."""
    out = {}
    for cp in (False, True):
        model, inputs = build("musubi")
        configs = [hookwise.FirstBlockCache(threshold=0.3)]
        if cp:
            configs.append(hookwise.ContextParallel(ring=world))
        hookwise.apply(model, *configs)
        with torch.no_grad():
            x = denoise(model, "musubi", inputs, steps=8, cfg=None)
        out[cp] = (x, hookwise.cache.cache_stats(model)["first_block_cache"]["branches"])
    return _error(out[True][0], out[False][0]), out[True][1], out[False][1]


def _run_casting(rank, world):
    """fp8-stored weights (cast per layer on each rank) under ring + Ulysses: the cast single-process output."""
    model, inputs = build("flux")
    hookwise.apply(model, hookwise.LayerwiseCasting(storage_dtype=torch.float8_e4m3fn))
    want = _output(model, inputs)
    hookwise.apply(model, hookwise.ContextParallel(ulysses=2, ring=world // 2))
    got = _output(model, inputs)
    return _error(got, want)


def _run_compose(rank, world):
    """Each rank's local attention through the applied attention backend (Ulysses); offloading per rank (ring)."""
    model, inputs = build("musubi")
    want = _output(model, inputs)
    hookwise.apply(model, hookwise.Attention(backend="sdpa-math"), hookwise.ContextParallel(ulysses=world))
    got = _output(model, inputs)
    routed = sum(m["routed"] for m in hookwise.attention_summary(model)["modules"].values())
    hookwise.remove(model)
    model, inputs = build("flux")
    want_offload = _output(model, inputs)
    hookwise.apply(model, hookwise.Offload(onload_device="cpu", offload_device="cpu"), hookwise.ContextParallel(ring=world))
    got_offload = _output(model, inputs)
    return {"backend": (_error(got, want), routed), "offload": _error(got_offload, want_offload)}


# ---- LTX-Video, Qwen-Image, SD3 and HunyuanVideo: their plans (rotary tuples, text masks) ----------
MODELS = ("ltx-video", "qwen-image", "sd3", "hunyuanvideo")
LAYOUTS = ((2, 1), (1, 2))  # (ulysses, ring)


def _text_mask(batch: int, length: int, valid: list[int], dtype=torch.bool) -> torch.Tensor:
    """A key-padding text mask: sample i keeps its first valid[i] tokens."""
    return (torch.arange(length)[None] < torch.tensor(valid)[:, None]).to(dtype)


def _inputs(name: str, uneven: bool) -> tuple[nn.Module, dict]:
    """The tiny model and its inputs; `uneven`: token counts 2 does not divide and padded text masks."""
    model, inputs = TINY_DIFFUSERS[name]()
    if not uneven:
        return model, inputs
    g = torch.Generator().manual_seed(1)
    b = inputs["hidden_states"].shape[0]
    valid = [8, 11][:b] if b == 2 else [8]
    if name == "ltx-video":
        inputs.update(hidden_states=torch.randn(b, 1 * 5 * 7, 4, generator=g), num_frames=1, height=5, width=7,
                      encoder_hidden_states=torch.randn(b, 11, 16, generator=g), encoder_attention_mask=_text_mask(b, 11, valid))
    elif name == "qwen-image":
        inputs.update(hidden_states=torch.randn(b, 3 * 5, 16, generator=g), img_shapes=[(1, 3, 5)] * b,
                      encoder_hidden_states=torch.randn(b, 11, 16, generator=g),
                      encoder_hidden_states_mask=_text_mask(b, 11, valid, torch.long))
    elif name == "sd3":
        inputs.update(hidden_states=torch.randn(b, 4, 5, 7, generator=g), encoder_hidden_states=torch.randn(b, 11, 32, generator=g))
    elif name == "hunyuanvideo":
        inputs.update(hidden_states=torch.randn(b, 4, 1, 5, 7, generator=g), encoder_hidden_states=torch.randn(b, 11, 16, generator=g),
                      encoder_attention_mask=_text_mask(b, 11, valid, torch.float32))
    return model, inputs


def _models(rank, world):
    results = {}
    for name in MODELS:
        for uneven in (False, True):
            model, inputs = _inputs(name, uneven)
            want = _output(model, inputs)
            for u, r in LAYOUTS:
                hookwise.apply(model, hookwise.ContextParallel(ulysses=u, ring=r))
                got = _output(model, inputs)
                stats = context_parallel_stats(model)
                hookwise.remove(model)
                results[(name, u, r, uneven)] = (_error(got, want), stats)
    return results


# ---- a custom DiT with a text key-padding mask -------------------------------------------------------
class MaskedBlock(nn.Module):
    """Joint attention over [text, image] with the text's padding masked (boolean), then the image's
    cross-attention to the text alone (an additive float mask: a rank's text may be all padding)."""

    def __init__(self, dim: int = 24, heads: int = 3, cross: bool = True) -> None:
        super().__init__()
        self.heads, self.cross = heads, cross
        self.img_qkv, self.txt_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.img_out, self.txt_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.cross_q, self.cross_kv, self.cross_out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mod = nn.Linear(dim, 2 * dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, img, txt, txt_mask, vec, query_mask=None):
        scale, shift = self.mod(vec)[:, None].chunk(2, dim=-1)
        iq, ik, iv = self.img_qkv(img * (1 + scale) + shift).chunk(3, dim=-1)
        tq, tk, tv = self.txt_qkv(txt).chunk(3, dim=-1)
        q, k, v = (self._heads(torch.cat(pair, dim=1)) for pair in ((tq, iq), (tk, ik), (tv, iv)))
        keep = torch.cat([txt_mask.bool(), torch.ones(img.shape[:2], dtype=torch.bool)], dim=1)[:, None, None, :]
        if query_mask is not None:  # a mask that differs between queries: refused under the split
            keep = keep & query_mask
        joint = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)
        txt = txt + self.txt_out(joint[:, : txt.shape[1]])
        img = img + self.img_out(joint[:, txt.shape[1] :])
        if not self.cross:
            return img, txt
        ck, cv = self.cross_kv(txt).chunk(2, dim=-1)
        bias = torch.zeros(txt_mask.shape).masked_fill(~txt_mask.bool(), float("-inf"))[:, None, None, :]
        cross = F.scaled_dot_product_attention(self._heads(self.cross_q(img)), self._heads(ck), self._heads(cv), attn_mask=bias)
        return img + self.cross_out(cross.transpose(1, 2).flatten(2)), txt


class MaskedDiT(nn.Module):
    def __init__(self, dim: int = 24, depth: int = 2, cross: bool = True) -> None:
        super().__init__()
        self.img_in, self.txt_in, self.t_in = nn.Linear(6, dim), nn.Linear(10, dim), nn.Linear(1, dim)
        self.blocks = nn.ModuleList([MaskedBlock(dim, cross=cross) for _ in range(depth)])
        self.out = nn.Linear(dim, 6)

    def forward(self, img, txt, txt_mask, t, query_mask=None):
        img, txt, vec = self.img_in(img), self.txt_in(txt), self.t_in(t[:, None])
        for block in self.blocks:
            img, txt = block(img, txt, txt_mask, vec, query_mask)
        return self.out(img)


def _masked(uneven: bool, cross: bool = True):
    """Batch 2: sample 0 keeps 3 text tokens (the second rank's text is all padding), sample 1 all of them."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    n, t = (13, 9) if uneven else (16, 8)
    inputs = dict(img=torch.randn(2, n, 6, generator=g), txt=torch.randn(2, t, 10, generator=g),
                  txt_mask=_text_mask(2, t, [3, t]), t=torch.tensor([0.3, 0.8]))
    return MaskedDiT(cross=cross).eval(), inputs


def _masks(rank, world):
    results = {}
    for uneven in (False, True):
        model, inputs = _masked(uneven)
        want = _output(model, inputs)
        for u, r in LAYOUTS:
            hookwise.apply(model, hookwise.ContextParallel(ulysses=u, ring=r))
            got = _output(model, inputs)
            results[(u, r, uneven)] = (_error(got, want), context_parallel_stats(model))
            hookwise.remove(model)
    # a mask that differs between queries is refused with the reason
    model, inputs = _masked(False)
    hookwise.apply(model, hookwise.ContextParallel(ring=world))
    rows = torch.ones(1, 1, 24 // world, 24 // world, dtype=torch.bool).tril()
    try:
        _output(model, {**inputs, "query_mask": rows})
        results["query-dependent"] = None
    except hookwise.HookwiseError as exc:
        results["query-dependent"] = str(exc)
    return results


def _mask_exchanges(rank, world):
    """Three forwards (the same mask twice, then another): the exchanges counted after each, and each output's
    error; on a DiT whose blocks all attend under one mask (joint) and on one with two (joint and cross)."""
    results = {}
    for cross in (False, True):
        for u, r in LAYOUTS:
            model, first = _masked(True, cross)
            second = {**first, "txt_mask": _text_mask(2, first["txt"].shape[1], [5, 2])}
            wants = [_output(model, x) for x in (first, first, second)]
            hookwise.apply(model, hookwise.ContextParallel(ulysses=u, ring=r))
            seen = []
            for x, want in zip((first, first, second), wants):
                error = _error(_output(model, x), want)
                stats = context_parallel_stats(model)
                seen.append((error, stats["mask_exchanges"], stats["masks_reused"]))
            results[(cross, u, r)] = seen
            hookwise.remove(model)
    return results


# ---- ring steps through the applied attention backend ------------------------------------------------
def _backends(rank, world):
    results = {}
    for backend in ("sdpa-flash", "sdpa-math", "flex"):
        model, inputs = _masked(True)
        want = _output(model, inputs)
        hookwise.apply(model, hookwise.Attention(backend=backend), hookwise.ContextParallel(ring=world))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _output(model, inputs)
            _output(model, inputs)
        summary = hookwise.attention_summary(model)
        results[backend] = dict(
            error=_error(got, want),
            routed=sum(m["routed"] for m in summary["modules"].values()),
            chosen={c for m in summary["modules"].values() for c in m["chosen"].values()},
            stats=context_parallel_stats(model),
            warned=[str(w.message) for w in caught if "log-sum-exp" in str(w.message)],
        )
        hookwise.remove(model)
    return results


# ---- a custom DiT whose rotary tables come as a tuple (cos, sin): the structural default splits them ------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class RopeBlock(nn.Module):
    """Joint attention over [text, image], the image's queries and keys rotated by (cos, sin) tables of
    the image tokens ([tokens, head_dim], or [batch, tokens, head_dim] in a list)."""

    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.img_qkv, self.txt_qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, img, txt, rope, vec):
        cos, sin = rope
        if cos.dim() == 3:  # [batch, tokens, head_dim]: one table per sample
            cos, sin = cos[:, None], sin[:, None]
        heads = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        iq, ik, iv = (heads(t) for t in self.img_qkv(img + vec[:, None]).chunk(3, dim=-1))
        tq, tk, tv = (heads(t) for t in self.txt_qkv(txt).chunk(3, dim=-1))
        iq, ik = _rotate(iq, cos, sin), _rotate(ik, cos, sin)
        q, k, v = torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2)
        joint = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return img + joint[:, txt.shape[1] :], txt + joint[:, : txt.shape[1]]


class RopeDiT(nn.Module):
    def __init__(self, dim: int = 24, depth: int = 2, kind: str = "tuple") -> None:
        super().__init__()
        self.kind = kind
        self.img_in, self.txt_in, self.t_in = nn.Linear(6, dim), nn.Linear(10, dim), nn.Linear(1, dim)
        self.blocks = nn.ModuleList([RopeBlock(dim) for _ in range(depth)])
        self.out = nn.Linear(dim, 6)

    def forward(self, img, txt, t):
        n, half = img.shape[1], 4  # head_dim 8: 4 frequencies, rotate-half layout
        angles = torch.arange(n, dtype=torch.float32)[:, None] / (10.0 ** torch.arange(half))[None]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        rope = (cos, sin) if self.kind == "tuple" else [cos.expand(img.shape[0], -1, -1), sin.expand(img.shape[0], -1, -1)]
        img, txt, vec = self.img_in(img), self.txt_in(txt), self.t_in(t[:, None])
        for block in self.blocks:
            img, txt = block(img, txt, rope, vec)
        return self.out(img)


def _rope_inputs(uneven: bool) -> dict:
    g = torch.Generator().manual_seed(3)
    n, t = (13, 5) if uneven else (16, 6)
    return dict(img=torch.randn(2, n, 6, generator=g), txt=torch.randn(2, t, 10, generator=g), t=torch.tensor([0.3, 0.8]))


def _rope(rank, world):
    results = {}
    for kind in ("tuple", "list"):
        for uneven in (False, True):
            torch.manual_seed(0)
            model, inputs = RopeDiT(kind=kind).eval(), _rope_inputs(uneven)
            want = _output(model, inputs)
            for u, r in LAYOUTS:
                hookwise.apply(model, hookwise.ContextParallel(ulysses=u, ring=r))
                results[(kind, u, r, uneven)] = _error(_output(model, inputs), want)
                hookwise.remove(model)
    return results


def _all_two(rank, world):
    return {
        "cases": _run_cases(rank, world, CASES_2), "cache": _run_cache(rank, world), "compose": _run_compose(rank, world),
        "models": _models(rank, world), "masks": _masks(rank, world), "backends": _backends(rank, world),
        "rope": _rope(rank, world), "exchanges": _mask_exchanges(rank, world),
    }  # fmt: skip


def _run_mesh(rank, world):
    """ContextParallel on a 2-D DeviceMesh (ring x ulysses), uneven Wan tokens."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ring", "ulysses"))
    model, inputs = build("wan")
    inputs = _uneven("wan", inputs)
    want = _output(model, inputs)
    hookwise.apply(model, hookwise.ContextParallel(mesh=mesh))
    got = _output(model, inputs)
    return _error(got, want), context_parallel_stats(model)


def _masks_four(rank, world):
    """Masks on 4 ranks: each ring member's block is a Ulysses group's keys, its mask theirs (2 x 2)."""
    results = {}
    for u, r in ((4, 1), (1, 4), (2, 2)):
        model, inputs = _masked(True)
        want = _output(model, inputs)
        hookwise.apply(model, hookwise.ContextParallel(ulysses=u, ring=r))
        results[("masked-dit", u, r)] = _error(_output(model, inputs), want)
    model, inputs = _inputs("hunyuanvideo", True)
    want = _output(model, inputs)
    hookwise.apply(model, hookwise.ContextParallel(ulysses=2, ring=2))
    results[("hunyuanvideo", 2, 2)] = _error(_output(model, inputs), want)
    return results


def _all_four(rank, world):
    return {
        "cases": _run_cases(rank, world, CASES_4), "casting": _run_casting(rank, world), "mesh": _run_mesh(rank, world),
        "masks": _masks_four(rank, world),
    }  # fmt: skip


share_ranks(2, "context", _all_two)  # one spawn per world size for every parallel test module (dist_helpers)
share_ranks(4, "context", _all_four)


@pytest.fixture(scope="module")
def two():
    return shared_results(2, "context")


@pytest.fixture(scope="module")
def four():
    return shared_results(4, "context")


def _label(case):
    name, u, r, uneven = case
    return f"{name}-u{u}-r{r}-{'uneven' if uneven else 'even'}"


@pytest.mark.parametrize("case", CASES_2, ids=_label)
def test_two_ranks_give_the_single_process_output(two, case):
    for rank, result in enumerate(two):
        error, stats = result["cases"][case]
        assert error < TOL, f"rank {rank}: relative error {error:.3g}"
        assert stats["attention_calls"] > 0 and sum(stats["sent_bytes"].values()) > 0


@pytest.mark.parametrize("case", CASES_4, ids=_label)
def test_four_ranks_give_the_single_process_output(four, case):
    for rank, result in enumerate(four):
        error, stats = result["cases"][case]
        assert error < TOL, f"rank {rank}: relative error {error:.3g}"
        kinds = set(stats["sent_bytes"])
        assert ("ulysses" in kinds) == (case[1] > 1) and ("ring" in kinds) == (case[2] > 1)


def test_a_cache_decides_the_same_on_every_rank_and_as_one_process(two):
    errors = [result["cache"][0] for result in two]
    cp_branches = [result["cache"][1] for result in two]
    single = two[0]["cache"][2]
    assert cp_branches[0] == cp_branches[1] == single
    assert any(b["cached"] for b in single.values()), "the threshold must let the cache skip some steps"
    assert max(errors) < 1e-4


def test_local_attention_runs_on_the_applied_backend(two):
    for result in two:
        error, routed = result["compose"]["backend"]
        assert error < TOL
        assert routed == 5  # musubi's 2 double + 3 single blocks: each rank's exchanged call reached the backend


def test_offloading_composes_per_rank(two):
    assert max(result["compose"]["offload"] for result in two) < TOL


def test_a_device_mesh_gives_the_ring_and_ulysses_groups(four):
    for error, stats in (result["mesh"] for result in four):
        assert error < TOL
        assert (stats["ulysses"], stats["ring"]) == (2, 2) and {"ulysses", "ring"} <= set(stats["sent_bytes"])


def test_casting_composes_per_rank(four):
    assert max(result["casting"] for result in four) < TOL


def test_text_masks_follow_the_split_on_four_ranks_and_a_two_by_two_mesh(four):
    for rank, result in enumerate(four):
        assert len(result["masks"]) == 4
        for case, error in result["masks"].items():
            assert error < TOL, f"rank {rank}, {case}: relative error {error:.3g}"


def test_a_world_of_one_is_the_identity():
    world_of_one()
    results = _run_cases(0, 1, [("musubi", 1, 1, True), ("flux", 1, 1, True)])
    for error, stats in results.values():
        assert error == 0.0 and stats["world"] == 1 and stats["attention_calls"] == 0


def test_without_torch_distributed_the_error_says_how_to_launch():
    if dist.is_initialized():  # a world of one from another test in this process
        dist.destroy_process_group()
    model, _ = build("musubi")
    with pytest.raises(hookwise.HookwiseError, match="torch.distributed initialised(.|\n)*torchrun"):
        hookwise.apply(model, hookwise.ContextParallel())
    assert not hookwise.list_hooks(model)


def test_degrees_that_do_not_fill_the_world_are_refused():
    with pytest.raises(hookwise.ConfigError, match="ulysses"):
        hookwise.ContextParallel(ulysses=0)
    with pytest.raises(hookwise.ConfigError, match="plan"):
        hookwise.ContextParallel(plan={"hidden_states": "one"})
    assert hookwise.ContextParallel.from_dict(hookwise.ContextParallel(ring=2).to_dict()) == hookwise.ContextParallel(ring=2)


CASES_MODELS = [(m, u, r, uneven) for m in MODELS for (u, r) in LAYOUTS for uneven in (False, True)]


@pytest.mark.parametrize("case", CASES_MODELS, ids=_label)
def test_ltx_qwen_sd3_and_hunyuanvideo_give_the_single_process_output(two, case):
    for rank, result in enumerate(two):
        error, stats = result["models"][case]
        assert error < TOL, f"rank {rank}: relative error {error:.3g}"
        assert stats["attention_calls"] > 0 and sum(stats["sent_bytes"].values()) > 0


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"u{l[0]}-r{l[1]}")
@pytest.mark.parametrize("uneven", (False, True), ids=("even", "uneven"))
def test_a_text_padding_mask_follows_the_split_on_a_custom_dit(two, layout, uneven):
    for rank, result in enumerate(two):
        error, stats = result["masks"][(*layout, uneven)]
        assert error < TOL, f"rank {rank}: relative error {error:.3g}"
        assert stats["sent_bytes"]["mask"] > 0  # the masks were exchanged with the keys


def test_a_mask_that_differs_between_queries_is_refused_with_the_reason(two):
    for result in two:
        assert result["masks"]["query-dependent"] is not None and "differs between queries" in result["masks"]["query-dependent"]


def test_ring_steps_run_on_the_applied_backend(two):
    calls = 2 * 2 * 2  # 2 forwards x 2 blocks x 2 attention calls per block
    for result in two:
        for backend, got in result["backends"].items():
            assert got["error"] < TOL, backend
            assert got["chosen"] == {backend}
            assert got["routed"] == calls * 2, backend  # each call's 2 ring steps reached the backend
            assert got["stats"]["attention_calls"] == calls


def test_a_backend_whose_kernel_returns_the_log_sum_exp_is_used_as_is(two):
    for result in two:
        flash = result["backends"]["sdpa-flash"]
        assert flash["stats"]["lse_computed"] == 0 and flash["warned"] == []


@pytest.mark.parametrize("backend, kernel", [("sdpa-math", "math kernel"), ("flex", "flex_attention")])
def test_a_backend_without_the_log_sum_exp_falls_back_with_one_warning(two, backend, kernel):
    for result in two:
        got = result["backends"][backend]
        assert got["stats"]["lse_computed"] == 2 * 2 * 2 * 2  # every ring step
        assert len(got["warned"]) == 1 and kernel in got["warned"][0]


def test_a_plan_states_tuples_of_tables_and_refuses_malformed_ones():
    config = hookwise.ContextParallel(plan={"hidden_states": 1, "rope": {"items": [{"dim": 0, "parts": ["hidden_states"]}]}})
    assert hookwise.ContextParallel.from_dict(config.to_dict()) == config
    for bad in ({"rope": {"items": []}}, {"rope": {"items": [{"dim": 0}]}}, {"mask": {"dim": "last", "parts": ["txt"]}}):
        with pytest.raises(hookwise.ConfigError, match="items"):
            hookwise.ContextParallel(plan=bad)


def test_the_ring_asks_the_cuda_efficient_kernel_for_its_log_sum_exp():
    """SDPA asks the efficient kernel for its log-sum-exp only under grad; a ring step (no grad) asks it too,
    instead of computing it again (checked on meta tensors: the kernel's shapes, no CUDA needed)."""
    from hookwise.parallel._ring import _CaptureLSE

    q = torch.empty(1, 2, 40, 16, device="meta")
    capture = _CaptureLSE(q)
    with capture:
        torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, None, False)
    assert capture.lse is not None and tuple(capture.lse.shape) == (1, 2, 40)  # the kernel pads rows to 32: cut


@pytest.mark.parametrize("kind", ["tuple", "list"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"u{l[0]}-r{l[1]}")
@pytest.mark.parametrize("uneven", (False, True), ids=("even", "uneven"))
def test_rotary_tables_passed_as_a_tuple_follow_the_split_without_a_plan(two, kind, layout, uneven):
    for rank, result in enumerate(two):
        error = result["rope"][(kind, *layout, uneven)]
        assert error < TOL, f"rank {rank}: relative error {error:.3g}"


def _splitter_of(rank=0, world=2):
    from hookwise.parallel._seq import Splitter

    return Splitter(RopeBlock(), None, rank, world)


def test_the_structural_default_splits_each_table_of_a_tuple_along_its_stream():
    from hookwise.parallel._seq import Rope, Tables

    img, txt, vec = torch.randn(2, 13, 24), torch.randn(2, 5, 24), torch.randn(2, 24)
    cos, sin = torch.randn(13, 8), torch.randn(2, 13, 8)
    for rank, rows in ((0, slice(0, 7)), (1, slice(7, 13))):
        splitter = _splitter_of(rank)
        args, kwargs = splitter.split((img, txt, (cos, sin), vec), {})
        bound = splitter.signature.bind(*args, **kwargs).arguments
        assert splitter._streams({"img": img, "txt": txt, "rope": (cos, sin), "vec": vec})["rope"] == Tables(
            (Rope(0, ("img",)), Rope(1, ("img",))))  # a batch-first table splits its token dim, not the batch
        assert torch.equal(bound["rope"][0], cos[rows]) and torch.equal(bound["rope"][1], sin[:, rows])
        assert isinstance(bound["rope"], tuple) and torch.equal(bound["vec"], vec)


@pytest.mark.parametrize(
    "txt_tokens, rope_rows, why",
    [(13, 13, "several"), (5, 18, "concatenation of several streams")],
    ids=("two-streams-of-one-length", "a-table-of-both-streams"),
)
def test_a_tuple_the_default_cannot_place_is_refused_naming_the_argument(txt_tokens, rope_rows, why):
    img, txt, vec = torch.randn(2, 13, 24), torch.randn(2, txt_tokens, 24), torch.randn(2, 24)
    table = torch.randn(rope_rows, 8)
    with pytest.raises(hookwise.HookwiseError, match=f"'rope'(.|\n)*{why}(.|\n)*plan="):
        _splitter_of().split((img, txt, (table, table), vec), {})


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"u{l[0]}-r{l[1]}")
@pytest.mark.parametrize("cross", (False, True), ids=("one-mask", "two-masks"))
def test_a_mask_is_exchanged_once_per_forward_and_again_when_it_changes(two, cross, layout):
    masks = 2 if cross else 1  # distinct masks per forward; each of the 2 blocks attends under each once
    for rank, result in enumerate(two):
        seen = result["exchanges"][(cross, *layout)]
        assert [exchanged for _, exchanged, _ in seen] == [masks, 2 * masks, 3 * masks], f"rank {rank}"
        assert [reused for _, _, reused in seen] == [masks, 2 * masks, 3 * masks]  # the second block's calls
        assert max(error for error, _, _ in seen) < TOL, f"rank {rank}"


def test_a_mask_written_in_place_is_not_taken_for_the_one_exchanged_before():
    from hookwise.parallel.context import Layout, Record

    record = Record(Layout(None, 0, 2, 2, 1))
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    record.mask_cache.append((mask, mask._version, mask.clone(), []))
    assert record._cached_mask(mask, mask) == 0  # the same tensor, unchanged
    assert record._cached_mask(mask.clone(), mask.clone()) == 0  # equal values
    mask[0, ..., 4:] = False
    assert record._cached_mask(mask, mask) == -1  # written since: exchanged again
    record.new_forward()
    assert record._cached_mask(torch.ones(2, 1, 1, 6, dtype=torch.bool), torch.ones(2, 1, 1, 6, dtype=torch.bool)) == -1
