"""`hookwise plan --gpus N`: the parallel techniques' cost declarations put context, CFG and data parallelism
among the options only when N > 1, each with one rank's bytes and the bytes it sends per step (a declared
estimate, said so), FSDP never after a technique it refuses, and the fake run never asked for them."""

import json

import pytest

from types import SimpleNamespace

from hookwise import CFGParallel, ContextParallel, DataParallel
from hookwise.cli import main
from hookwise.core import technique_named, technique_of
from hookwise.core.cost import CostContext, Footprint, Placement
from hookwise.errors import ConfigError
from hookwise.plan import Hardware, Job
from hookwise.plan.estimate import ActivationEstimate
import plan_helpers

# autouse fixtures: activations stated, stack checks recorded and not run, each spec built and described once
stated_activations, stack_checks = plan_helpers.stated_activations, plan_helpers.stack_checks
one_map_per_spec = plan_helpers.one_map_per_spec

MACHINE = ["--ram", "64GB", "--h2d", "25GB/s", "--tflops", "450", "--disk-read", "2GB/s", "--vram", "80GB"]


def _plan(capsys, *extra, check=False):
    args = ["plan", "flux.1-dev", *MACHINE, "--json", *([] if check else ["--no-stack-check"]), *extra]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    return data, {o["label"]: o for o in data["options"]}


# ---- the declarations alone, on a stated footprint and machine (fast) -------------------------------
GIB = 2**30
FOOTPRINT = Footprint("denoiser", total_bytes=24 * GIB, blocks=(1 * GIB,) * 20, leaves=(), high_precision_bytes=0,
                      param_count=12 * 10**9)  # fmt: skip


def _ctx(gpus=2, link=25e9, training=False, cfg=None, batch=2, measurements=None):
    hw = SimpleNamespace(gpus=gpus, link=link, device="cuda")
    job = Job(training=training, cfg=cfg, batch=batch)
    return CostContext(hardware=hw, job=job, device_room=60 * GIB, ram_room=60 * GIB, training=training, cfg=cfg,
                       measurements=measurements or {}, tokens=4608, hidden=3072, attention_layers=57,
                       trainable_bytes=100 * 2**20, output_bytes=2 * 4096 * 64 * 2)  # fmt: skip


def _offered(ctx):
    return {name: technique_named(name).cost.options(Placement.resident(FOOTPRINT), ctx)
            for name in ("context_parallel", "cfg_parallel", "data_parallel")}  # fmt: skip


def _effect(config, ctx):
    return technique_of(config).cost.effect(Placement.resident(FOOTPRINT), config, ctx)


def test_one_gpu_offers_no_parallel_technique():
    for ctx in (_ctx(gpus=1), _ctx(gpus=1, cfg="batched"), _ctx(gpus=1, training=True)):
        assert _offered(ctx) == {"context_parallel": [], "cfg_parallel": [], "data_parallel": []}


def test_what_each_gpu_count_and_job_is_offered():
    assert _offered(_ctx()) == {"context_parallel": [ContextParallel(ulysses=2), ContextParallel(ring=2)],
                                "cfg_parallel": [], "data_parallel": []}  # fmt: skip
    assert _offered(_ctx(cfg="batched"))["cfg_parallel"] == [CFGParallel()]
    assert _offered(_ctx(gpus=4, cfg="batched"))["cfg_parallel"] == [CFGParallel(context=2)]  # the CFG dim of 2 x 2
    assert _offered(_ctx(gpus=3, cfg="batched"))["cfg_parallel"] == []  # CFG parallelism is degree 2
    assert _offered(_ctx(cfg="separate"))["cfg_parallel"] == []
    assert _offered(_ctx(training=True)) == {"context_parallel": [], "cfg_parallel": [],
                                             "data_parallel": [DataParallel(mode="ddp"), DataParallel(mode="fsdp")]}  # fmt: skip
    assert _offered(_ctx(training=True, batch=3))["data_parallel"] == []  # the batch must split over the GPUs


def test_context_parallelism_splits_activations_and_compute_and_states_its_traffic():
    ctx = _ctx()
    shard = 4608 / 2 * 3072 * 2 * 2  # one rank's tokens x width x bf16, batch 2
    ulysses, ring = _effect(ContextParallel(ulysses=2), ctx), _effect(ContextParallel(ring=2), ctx)
    gather = ctx.output_bytes / 2
    assert ulysses.comm_bytes == int(57 * 4 * shard / 2 + gather)  # q, k, v, output: half of each leaves the rank
    assert ring.comm_bytes == int(57 * 2 * shard + gather)  # K and V passed on once
    for placed in (ulysses, ring):
        assert placed.activation_share == 0.5 and placed.compute_factor == 0.5
        assert placed.device_bytes == FOOTPRINT.total_bytes  # the weights are replicated
        assert any("a declared estimate, not measured" in n for n in placed.notes)
    four = _effect(ContextParallel(ring=4), _ctx(gpus=4))
    assert four.comm_bytes > ring.comm_bytes and four.compute_factor == 0.25


def test_fsdp_shards_the_base_and_gathers_it_while_ddp_only_averages_the_lora():
    ctx = _ctx(training=True)
    ddp, fsdp = _effect(DataParallel(mode="ddp"), ctx), _effect(DataParallel(mode="fsdp"), ctx)
    assert ddp.device_bytes == FOOTPRINT.total_bytes and ddp.comm_bytes == ctx.trainable_bytes  # 2 (N-1)/N
    assert fsdp.device_bytes == FOOTPRINT.total_bytes // 2
    assert fsdp.transient_bytes == FOOTPRINT.outside_bytes + 2 * GIB  # the root's own and two blocks gathered
    assert fsdp.comm_bytes == int(FOOTPRINT.total_bytes + ctx.trainable_bytes / 2)  # the base gathered twice
    assert ddp.activation_share == fsdp.activation_share == 0.5


def test_a_measured_step_time_replaces_the_declared_model():
    measured = {"speed": {"context_parallel": {"cuda": {"forward": 0.6}}}}
    placed = _effect(ContextParallel(ulysses=2), _ctx(measurements=measured))
    assert placed.compute_factor == pytest.approx(0.6) and placed.comm_bytes == 0
    assert any("measured x0.60" in n for n in placed.notes)


def test_a_gpu_count_is_checked_and_travels_with_the_hardware():
    with pytest.raises(ConfigError, match="gpus=0"):
        Hardware.detect(vram="24GB", gpus=0)
    hw = Hardware.detect(vram="24GB", gpus=4, link="300GB/s", probe=False)
    assert Hardware.from_dict(hw.to_dict()) == hw and "4 GPUs" in hw.describe()
    assert Hardware.from_dict({k: v for k, v in hw.to_dict().items() if k not in ("gpus", "link")}).gpus == 1  # older plans


# ---- the planner (`hookwise plan --gpus 2`): the options come from the declarations ----------------------
def test_two_gpus_sampling_plans_context_or_cfg_parallelism_with_its_declared_peak(stack_checks):
    from hookwise.introspect.specs import build_spec
    from hookwise.plan import make_plan

    hw = Hardware.detect(vram="80GB", ram="64GB", h2d="25GB/s", tflops=450, disk_read="2GB/s", gpus=2, link="300GB/s")
    stated = lambda *a, **k: ActivationEstimate(2 * 10**9, "stated")  # noqa: E731
    # no step-cache rows: their options (many) are not what this checks
    plan = make_plan(build_spec("flux.1-dev"), Job(cfg="batched"), hw, activation_estimator=stated,
                     measurements={"cache": []}, stack_check=True)  # fmt: skip
    options = {o.label: o for o in plan.options}
    plain = options["all resident"]
    for label in ("context_parallel(ulysses=2)", "context_parallel(ring=2)", "cfg_parallel"):
        option = options[label]
        assert option.activation_bytes == plain.activation_bytes // 2
        assert option.weights_on_device == plain.weights_on_device
        assert 0.5 <= option.time_rel < 1.0
    assert options["context_parallel(ulysses=2)"].comm_bytes > options["cfg_parallel"].comm_bytes > 0
    assert not any("cfg_parallel" in label and "context_parallel" in label for label in options)  # one world group
    assert not any("data_parallel" in label for label in options)
    # chosen: a parallel stack, its peak by declaration (a fake run cannot make ranks), the fake run not asked
    assert "parallel" in plan.chosen.label and plan.peak_source == "declarations" and stack_checks == []
    assert any("a fake run cannot model" in n for n in plan.chosen.notes)
    assert "hookwise.CFGParallel()" in plan.python_line() or "hookwise.ContextParallel(" in plan.python_line()


def test_two_gpus_training_plans_ddp_and_fsdp_and_never_fsdp_after_what_it_refuses(capsys):
    _, options = _plan(capsys, "--gpus", "2", "--training", "--batch", "2")
    plain, ddp, fsdp = options["all resident"], options["data_parallel"], options["data_parallel(mode=fsdp)"]
    assert fsdp["weights_on_device"] == pytest.approx(plain["weights_on_device"] / 2, rel=0.01)
    assert ddp["weights_on_device"] == plain["weights_on_device"]
    assert ddp["activation_bytes"] == fsdp["activation_bytes"] < plain["activation_bytes"]
    # the rest of each rank's peak is the LoRA with its gradients and Adam moments: whole under DDP, sharded under FSDP
    lora = {k: o["device_peak"] - o["weights_on_device"] - o["transient_bytes"] - o["activation_bytes"]
            for k, o in (("plain", plain), ("ddp", ddp), ("fsdp", fsdp))}  # fmt: skip
    assert lora["plain"] == lora["ddp"] > 0 and abs(lora["fsdp"] - lora["ddp"] / 2) <= 1
    assert any(label.startswith("offload") and label.endswith("+ data_parallel") for label in options)  # ddp composes
    # the job checkpoints by itself, and every other option (casting, quantization, offload) is refused by FSDP2
    assert [label for label in options if "mode=fsdp" in label] == ["data_parallel(mode=fsdp)"]
    assert any(label.startswith("casting") and label.endswith("+ data_parallel") for label in options)  # not by ddp
    assert not any("context_parallel" in label or "cfg_parallel" in label for label in options)


# ---- CFG x context parallelism on 2N GPUs: the two declarations compose ---------------------------------
def test_on_four_gpus_context_parallelism_takes_the_gpus_cfg_parallelism_leaves():
    from hookwise.parallel._dist import cfg_mesh_ranks

    ctx = _ctx(gpus=4, cfg="batched")
    cfg = technique_named("cfg_parallel").cost
    halved = cfg.effect(Placement.resident(FOOTPRINT), CFGParallel(context=2), ctx)
    assert halved.mesh == (("cfg", 2),) and halved.ranks == 2
    cp = technique_named("context_parallel").cost
    options = cp.options(halved, ctx)
    assert options == [ContextParallel(ulysses=2, cfg=2), ContextParallel(ring=2, cfg=2)]
    both = cp.effect(halved, options[0], ctx)
    alone = _effect(ContextParallel(ulysses=2), _ctx(gpus=2, cfg="batched"))
    assert both.ranks == 4 and both.compute_factor == 0.25 and both.activation_share == 0.25
    # context parallelism inside a CFG half moves half the batch's tokens: half of what it moves alone on 2 GPUs
    assert both.comm_bytes - halved.comm_bytes == pytest.approx(alone.comm_bytes / 2, rel=1e-6)
    # on 2 GPUs CFG parallelism leaves none: context parallelism offers nothing after it
    assert cp.options(cfg.effect(Placement.resident(FOOTPRINT), CFGParallel(), _ctx(cfg="batched")), _ctx(cfg="batched")) == []
    # the mesh both configs build from their fields: pairs (i, i + N), halves [0, N) and [N, 2N)
    assert cfg_mesh_ranks(4, 2) == ([[0, 2], [1, 3]], [[0, 1], [2, 3]])
    assert cfg_mesh_ranks(8, 2) == ([[0, 4], [1, 5], [2, 6], [3, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_cfg_and_context_parallelism_refuse_a_split_they_do_not_share():
    from hookwise.core.techniques import refusal

    assert refusal(CFGParallel(context=2), ContextParallel(ulysses=2, cfg=2)) is None
    assert refusal(CFGParallel(), ContextParallel(ulysses=2)) is None  # each on its own group (a DeviceMesh)
    assert "cfg=2" in refusal(CFGParallel(context=2), ContextParallel(ulysses=2))
    assert "context=N" in refusal(CFGParallel(), ContextParallel(ring=2, cfg=2))
    assert "does not fill" in refusal(CFGParallel(context=4), ContextParallel(ulysses=2, ring=1, cfg=2))
    assert "cfg=2" in ContextParallel(ulysses=2).refuses_to_precede(CFGParallel(context=2))  # applied in two calls
    for bad in (dict(cfg=3), dict(cfg=2, group=object())):
        with pytest.raises(ConfigError, match="cfg"):
            ContextParallel(**bad)
    with pytest.raises(ConfigError, match="context"):
        CFGParallel(context=2, group=object())
    for config in (CFGParallel(context=2), ContextParallel(ulysses=2, cfg=2)):
        assert type(config).from_dict(config.to_dict()) == config  # the split is saved with the stack


def test_four_gpus_sampling_plans_cfg_and_context_parallelism_together(stack_checks):
    from hookwise.plan import make_plan
    from hookwise.stack import Stack
    from model_helpers import TINY_DIFFUSERS

    model, _ = TINY_DIFFUSERS["flux"]()
    hw = Hardware.detect(vram="80GB", ram="64GB", h2d="25GB/s", tflops=450, disk_read="2GB/s", gpus=4, link="300GB/s")
    stated = lambda *a, **k: ActivationEstimate(2 * 10**9, "stated")  # noqa: E731
    plan = make_plan(model, Job(cfg="batched"), hw, activation_estimator=stated, measurements={"cache": []})
    options = {o.label: o for o in plan.options}
    combined = [o for label, o in options.items() if "cfg_parallel(context=2)" in label]
    assert {o.label for o in combined} >= {
        "context_parallel(ulysses=2, cfg=2) + cfg_parallel(context=2)", "context_parallel(ring=2, cfg=2) + cfg_parallel(context=2)",
    } or {o.label for o in combined} >= {
        "cfg_parallel(context=2) + context_parallel(ulysses=2, cfg=2)", "cfg_parallel(context=2) + context_parallel(ring=2, cfg=2)",
    }, sorted(options)
    assert all("context_parallel" in o.label for o in combined)  # CFG alone would leave 2 of the 4 GPUs idle
    plain, ulysses = options["all resident"], options["context_parallel(ulysses=4)"]
    best = min(combined, key=lambda o: o.time_rel)
    assert best.activation_bytes == plain.activation_bytes // 4 and best.comm_bytes < ulysses.comm_bytes
    # the stack the plan writes carries the split and loads back as the same configs
    stack = Stack(*best.configs)
    assert Stack.from_dict(stack.to_dict()).configs == stack.configs
    assert {type(c).__name__ for c in stack.configs} == {"CFGParallel", "ContextParallel"}
