"""CFG parallelism and data-parallel LoRA training on 2 CPU processes (gloo, 1 thread each).

Model: a FLUX transformer built from a small config (diffusers' FluxTransformer2DModel, 2 double +
4 single blocks, 4 heads x 64 = 256 wide, `--tokens` image and 64 text tokens, random weights, float32).
Variants, interleaved in the same spawned processes, medians of `--repeats` timed calls after a warm-up:

- CFG: one process runs the batched-CFG call (batch 2: the two halves) while the other rank waits at a
  barrier; then `CFGParallel` on both ranks (each computes one half, the output is all-gathered).
- LoRA step (rank-16 peft LoRA on the attention projections, AdamW): one process on the whole batch
  (`--batch`) while the other waits; then two ranks on half the batch each, with hookwise's
  `DataParallel(mode="ddp")` and with torch's `DistributedDataParallel` wrapper (each on its own
  copy of the model, the same weights). Bytes communicated per step: the all-reduced gradient payload.

    python benchmarks/parallel_dp.py [--tokens 256] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

warnings.filterwarnings("ignore")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def build(tokens: int, batch: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
                                   num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                                   axes_dims_rope=[16, 24, 24]).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(batch, tokens, 16, generator=g),
                  encoder_hidden_states=torch.randn(batch, 64, 64, generator=g),
                  pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.full((batch,), 0.5),
                  img_ids=torch.randn(tokens, 3, generator=g), txt_ids=torch.randn(64, 3, generator=g),
                  return_dict=False)  # fmt: skip
    return model, inputs


def lora(model):
    import peft

    model.requires_grad_(False)
    peft.inject_adapter_in_model(peft.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False), model)
    return model


def half(inputs, rank, batch):
    n = batch // 2
    return {k: v[rank * n : (rank + 1) * n] if isinstance(v, torch.Tensor) and v.shape[0] == batch else v for k, v in inputs.items()}


def timed(fn, repeats_out: list) -> None:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    repeats_out.append(time.perf_counter() - t0)


def worker(rank: int, world: int, init: str, args, queue) -> None:
    import hookwise
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    b = args.batch
    base, inputs = build(args.tokens, b)
    # CFG: the batched call carries the two halves: equal latents, two conditionings
    cfg_in = dict(inputs, hidden_states=torch.cat([inputs["hidden_states"][:1]] * 2),
                  encoder_hidden_states=inputs["encoder_hidden_states"][:2], pooled_projections=inputs["pooled_projections"][:2],
                  timestep=inputs["timestep"][:2])  # fmt: skip
    single_cfg = copy.deepcopy(base)
    par_cfg = copy.deepcopy(base)
    hookwise.apply(par_cfg, hookwise.CFGParallel())
    # LoRA training: a copy per variant, the same weights
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    models = {}
    for name in ("single", "hookwise DataParallel", "torch DDP"):
        torch.manual_seed(1)
        models[name] = lora(copy.deepcopy(base)).train()
    hookwise.apply(models["hookwise DataParallel"], hookwise.DataParallel())
    ddp = DistributedDataParallel(models["torch DDP"])
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}
    mine = half(inputs, rank, b)
    mine_target = target[rank * b // 2 : (rank + 1) * b // 2]

    def step(name):
        model = ddp if name == "torch DDP" else models[name]
        x, y = (inputs, target) if name == "single" else (mine, mine_target)
        loss = torch.nn.functional.mse_loss(model(**x)[0], y)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    times = {k: [] for k in ("cfg single", "cfg parallel", *models)}
    for repeat in range(args.repeats + 1):
        with torch.no_grad():
            timed(lambda: rank == 0 and single_cfg(**cfg_in), times["cfg single"])
            timed(lambda: par_cfg(**cfg_in), times["cfg parallel"])
        timed(lambda: rank == 0 and step("single"), times["single"])
        timed(lambda: step("hookwise DataParallel"), times["hookwise DataParallel"])
        timed(lambda: step("torch DDP"), times["torch DDP"])
    with torch.no_grad():
        same = torch.allclose(single_cfg(**cfg_in)[0], par_cfg(**cfg_in)[0], atol=1e-5)
    trainable = sum(p.numel() * p.element_size() for p in models["single"].parameters() if p.requires_grad)
    if rank == 0:
        queue.put(({k: statistics.median(v[1:]) for k, v in times.items()}, same, trainable))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=worker, args=(r, 2, os.path.join(tmp, "init"), args, queue)) for r in range(2)]
        for p in procs:
            p.start()
        medians, same, trainable = queue.get()
        for p in procs:
            p.join()
    print(f"torch {torch.__version__}, 2 gloo processes x 1 thread, load {open('/proc/loadavg').read().split()[:3]}")
    print(f"CFG call (batch 2, {args.tokens} tokens): one process {medians['cfg single'] * 1e3:.0f} ms, "
          f"CFGParallel on 2 ranks {medians['cfg parallel'] * 1e3:.0f} ms "
          f"(speed-up {medians['cfg single'] / medians['cfg parallel']:.2f}x; outputs equal: {same})")
    print(f"LoRA step, whole batch {args.batch}; trainable {trainable / 2**20:.2f} MiB all-reduced per step on 2 ranks")
    for k in ("single", "hookwise DataParallel", "torch DDP"):
        print(f"  {k:24s} {medians[k] * 1e3:7.0f} ms   {medians['single'] / medians[k]:.2f}x of one process")


if __name__ == "__main__":
    main()
