"""Context parallelism on spawned gloo ranks: Ulysses, ring and both give the single-process output.

Spawning costs seconds (each rank imports torch and diffusers), so each world size is spawned once
(a module fixture) and every rank runs all the cases of that world, returning each case's error
against the single-process model, which every rank also computes itself.
"""

import pytest
import torch
import torch.distributed as dist

import hookwise
from hookwise.parallel import context_parallel_stats

from cache_helpers import build, denoise
from dist_helpers import run_ranks, world_of_one

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


def _all_two(rank, world):
    return {"cases": _run_cases(rank, world, CASES_2), "cache": _run_cache(rank, world), "compose": _run_compose(rank, world)}


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


def _all_four(rank, world):
    return {"cases": _run_cases(rank, world, CASES_4), "casting": _run_casting(rank, world), "mesh": _run_mesh(rank, world)}


@pytest.fixture(scope="module")
def two():
    return run_ranks(_all_two, 2, timeout=300)


@pytest.fixture(scope="module")
def four():
    return run_ranks(_all_four, 4, timeout=300)


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
