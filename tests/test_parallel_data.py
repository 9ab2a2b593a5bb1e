"""Data-parallel LoRA training on 2 gloo ranks (DataParallel): DDP (plain, under fp8 casting with
checkpointing, under offloading) and FSDP2 with checkpointing train the same LoRA as one process on the concatenated batch; a rank that is
stuck or gone ends the others with a CollectiveError naming the timeout, within it.

One spawn of two ranks runs every scenario (starting a rank imports torch and diffusers: seconds each)."""

import contextlib
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import hookwise
from hookwise.parallel import data_parallel_report, no_sync

from cache_helpers import build
from dist_helpers import run_ranks

BATCH = 4  # the whole batch; each of the 2 ranks trains on half of it
STEPS = 3
TIMEOUT_S = 3.0


def _lora_model(seed):
    import peft

    model, inputs = build("flux", BATCH)
    model.requires_grad_(False)
    torch.manual_seed(seed)  # a different LoRA initialisation per rank: DataParallel broadcasts rank 0's
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    peft.inject_adapter_in_model(config, model)
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    return model, inputs, target


def _shard(inputs, target, rank, world):
    n = BATCH // world
    cut = {k: (v[rank * n : (rank + 1) * n] if isinstance(v, torch.Tensor) and v.shape[0] == BATCH else v)
           for k, v in inputs.items()}  # fmt: skip
    return cut, target[rank * n : (rank + 1) * n]


def _lora(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().clone()
    return out


def _local_bytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor (FSDP2): this rank's shard
    return t.numel() * t.element_size()


def _held(model, opt):
    """This rank's bytes of the LoRA: its parameters, their gradients and the optimizer's state (Adam's moments)."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"params": sum(map(_local_bytes, params)), "grads": sum(_local_bytes(p.grad) for p in params),
            "optimizer": sum(map(_local_bytes, state))}  # fmt: skip


def _train(model, inputs, target):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = F.mse_loss(model(**inputs).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, _lora(model), _held(model, opt)


def _stack(kind):
    if kind == "fp8+checkpointing":
        return [hookwise.LayerwiseCasting(storage_dtype=torch.float8_e4m3fn), hookwise.Checkpointing()]
    if kind == "offload":
        return [hookwise.Offload(onload_device="cpu", offload_device="cpu")]
    if kind == "fsdp+checkpointing":
        return [hookwise.Checkpointing()]
    return []


def _scenario(rank, world, kind, mode="ddp"):
    single = None
    if rank == 0:  # one process on the whole batch, from rank 0's LoRA initialisation
        model, inputs, target = _lora_model(100)
        if _stack(kind):
            hookwise.apply(model, *_stack(kind))
        single = _train(model, inputs, target)
    model, inputs, target = _lora_model(100 + rank)
    hookwise.apply(model, *_stack(kind), hookwise.DataParallel(mode=mode))
    inputs, target = _shard(inputs, target, rank, world)
    losses, lora, held = _train(model, inputs, target)
    return dict(single=single, losses=losses, lora=lora, held=held, report=data_parallel_report(model))


MICRO = 2  # micro-batches per optimizer step in the accumulation scenarios


class _Count:
    """Counts this rank's calls of the gradient collectives (torch.distributed's functions, wrapped)."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_single")  # FSDP2: *_single

    def __enter__(self):
        self.real = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        self.calls = {n: 0 for n in self.real}
        for name, fn in self.real.items():
            def counted(*args, _name=name, _fn=fn, **kwargs):
                self.calls[_name] += 1
                return _fn(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.real.items():
            setattr(dist, name, fn)


def _accumulate(model, inputs, target):
    """STEPS optimizer steps of MICRO micro-batches each, all but the last inside no_sync; the collectives
    of each micro-step counted."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    n = target.shape[0] // MICRO
    per_step = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        counts = []
        for i in range(MICRO):
            micro = {k: (v[i * n : (i + 1) * n] if isinstance(v, torch.Tensor) and v.shape[0] == target.shape[0] else v)
                     for k, v in inputs.items()}  # fmt: skip
            with _Count() as count, no_sync(model) if i < MICRO - 1 else contextlib.nullcontext():
                (F.mse_loss(model(**micro).sample, target[i * n : (i + 1) * n]) / MICRO).backward()
            counts.append(count.calls)
        per_step.append(counts)
        opt.step()
    return per_step, _lora(model)


def _accumulation(rank, world, mode):
    # the single-process reference is the "plain" scenario's (the same initialisation, batch and steps)
    model, inputs, target = _lora_model(100 + rank)
    hookwise.apply(model, hookwise.DataParallel(mode=mode))
    inputs, target = _shard(inputs, target, rank, world)
    collectives, lora = _accumulate(model, inputs, target)
    return dict(lora=lora, collectives=collectives, report=data_parallel_report(model))


def _stuck_or_gone(rank, world, group, gone):
    model, inputs, target = _lora_model(100)
    dist.barrier()  # both ranks start the scenario together: the apply's broadcast must not wait on the other's sleep
    hookwise.apply(model, hookwise.DataParallel(group=group, timeout_s=TIMEOUT_S))
    inputs, target = _shard(inputs, target, rank, world)
    if rank == 1:  # stuck: never reaches the step's gradient average in time; gone: returns, the harness closes the group
        if not gone:
            time.sleep(2 * TIMEOUT_S)
        return None
    if gone:
        time.sleep(2 * TIMEOUT_S + 1.0)  # rank 1 has woken from the stuck scenario, returned and closed its connections
    began = time.monotonic()
    try:
        F.mse_loss(model(**inputs).sample, target).backward()
    except hookwise.HookwiseError as exc:
        return type(exc).__name__, str(exc), time.monotonic() - began
    return "no error", "", time.monotonic() - began


def _refused(rank, world):
    model, _, _ = _lora_model(100)
    try:
        hookwise.apply(model, hookwise.LayerwiseCasting(storage_dtype=torch.float8_e4m3fn), hookwise.DataParallel(mode="fsdp"))
    except hookwise.CompatibilityError as exc:
        return str(exc), hookwise.applied(model).names()
    return "applied", hookwise.applied(model).names()


def _ranks(rank, world):
    out = {kind: _scenario(rank, world, kind) for kind in ("plain", "fp8+checkpointing", "offload")}
    out["fsdp+checkpointing"] = _scenario(rank, world, "fsdp+checkpointing", mode="fsdp")
    out["refused"] = _refused(rank, world)
    out["accumulate-ddp"] = _accumulation(rank, world, "ddp")
    out["accumulate-fsdp"] = _accumulation(rank, world, "fsdp")
    stuck, gone = dist.new_group([0, 1]), dist.new_group([0, 1])
    out["stuck"] = _stuck_or_gone(rank, world, stuck, gone=False)
    out["gone"] = _stuck_or_gone(rank, world, gone, gone=True)
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_ranks, 2, pg_timeout=20.0, timeout=300.0)  # a loaded machine: minutes, not a hang


@pytest.mark.parametrize("kind", ["plain", "fp8+checkpointing", "offload", "fsdp+checkpointing"])
def test_two_ranks_train_the_same_lora_as_one_process_on_the_whole_batch(results, kind):
    single_losses, single_lora, _ = results[0][kind]["single"]
    ranks = [r[kind] for r in results]
    for r in ranks:
        assert r["report"]["ranks"] == 2
        if kind != "fsdp+checkpointing":
            assert r["report"]["syncs"] == STEPS
        assert sorted(r["lora"]) == sorted(single_lora)
        for name, value in single_lora.items():
            torch.testing.assert_close(r["lora"][name], value, rtol=1e-4, atol=1e-5, msg=f"{kind}: {name}")
    # each rank's loss is its half's mean; their mean is the whole batch's
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean_losses == pytest.approx(single_losses, rel=1e-5)
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the ranks did train on different data


def test_fsdp_refuses_fp8_casting_at_apply_with_the_reason_and_leaves_nothing(results):
    for r in results:
        message, names = r["refused"]
        assert "fsdp" in message and "casting" in message and "FSDP2" in message
        assert names == []


def test_a_stuck_rank_ends_the_others_with_an_error_naming_the_timeout_within_it(results):
    kind, message, seconds = results[0]["stuck"]
    assert kind == "CollectiveError"
    assert f"timeout ({TIMEOUT_S:g} s)" in message
    assert seconds < TIMEOUT_S + 2.0


def test_a_rank_that_left_ends_the_others_with_a_clear_error_before_the_timeout(results):
    kind, message, seconds = results[0]["gone"]
    assert kind == "CollectiveError"
    assert "died or left" in message and f"timeout ({TIMEOUT_S:g} s)" in message
    assert seconds < TIMEOUT_S + 2.0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_accumulating_micro_batches_on_two_ranks_trains_as_one_process_on_the_whole_batch(results, mode):
    single = results[0]["plain"]["single"][1]
    for r in (r[f"accumulate-{mode}"] for r in results):
        for name, value in single.items():
            torch.testing.assert_close(r["lora"][name], value, rtol=1e-4, atol=1e-5, msg=f"{mode}: {name}")


def test_accumulation_under_ddp_makes_one_gradient_all_reduce_per_optimizer_step(results):
    for r in (r["accumulate-ddp"] for r in results):
        assert r["report"]["syncs"] == STEPS
        # per optimizer step: nothing in the first micro-step, one all-reduce (one dtype of LoRA parameters) in the last
        assert [[c["all_reduce"] for c in micro] for micro in r["collectives"]] == [[0] * (MICRO - 1) + [1]] * STEPS


def test_accumulation_under_fsdp_reduces_gradients_only_in_the_last_micro_step(results):
    for r in (r["accumulate-fsdp"] for r in results):
        for micro in r["collectives"]:
            reduced = [c.get("reduce_scatter_single", 0) + c.get("reduce_scatter_tensor", 0) + c["all_reduce"] for c in micro]
            assert reduced[:-1] == [0] * (MICRO - 1) and reduced[-1] > 0, reduced


def test_fsdp_holds_the_share_of_the_lora_state_the_planner_declares_per_rank(results):
    """The planner's memory model: FSDP2 shards the LoRA's parameters, gradients and Adam moments with the base
    (`lora_share` 1/N), DDP keeps them whole on every rank; checked against what each rank really holds."""
    from types import SimpleNamespace

    from hookwise.core import technique_named
    from hookwise.core.cost import CostContext, Footprint, Placement

    fp = Footprint("denoiser", total_bytes=2**30, blocks=(2**28,) * 4, leaves=(), high_precision_bytes=0, param_count=10**8)
    ctx = CostContext(hardware=SimpleNamespace(gpus=2, link=25e9), job=SimpleNamespace(batch=BATCH), device_room=0,
                      ram_room=0, training=True, trainable_bytes=2**20)  # fmt: skip
    cost = technique_named("data_parallel").cost
    share = {mode: cost.effect(Placement.resident(fp), hookwise.DataParallel(mode=mode), ctx).lora_share for mode in ("ddp", "fsdp")}
    assert share == {"ddp": 1.0, "fsdp": 0.5}
    whole = results[0]["plain"]["single"][2]  # one process: the whole LoRA, its gradients and its moments
    assert all(v > 0 for v in whole.values()) and whole["optimizer"] == 2 * whole["params"]
    for mode, kind in (("ddp", "plain"), ("fsdp", "fsdp+checkpointing")):
        held = [r[kind]["held"] for r in results]
        for part in whole:
            assert sum(h[part] for h in held) == pytest.approx(whole[part] * share[mode] * 2, rel=0.02), (mode, part)
            for h in held:  # each rank its declared share (uneven shards: within a few rows)
                assert h[part] == pytest.approx(whole[part] * share[mode], rel=0.1), (mode, part, h[part])
