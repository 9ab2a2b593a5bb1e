"""Train the reference models on procedurally generated data, on the CPU, from a fixed seed.

    python -m hookwise.zoo.train flux-shapes            # 16x16 images of coloured shapes
    python -m hookwise.zoo.train wan-moving             # 8-frame 12x12 videos of moving shapes
    python -m hookwise.zoo.train all --out DIR          # both at once (a process each), into DIR/<name>

Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts noise - x0, t ~ logit-normal;
the class is dropped (replaced by the empty prompt) 10% of the time so classifier-free guidance
works. AdamW with warmup and cosine decay; the saved weights are an exponential moving average.
Each run writes the transformer (diffusers `save_pretrained`), the class-embedding table, a
metadata file with the seed, steps and measured time, and a sample grid PNG.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import make_images, make_videos
from .grid import save_sample_grid
from .reference import WEIGHTS_DIR, ReferenceModel, get_reference_spec, reference_names

logger = logging.getLogger("hookwise.zoo.train")


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    lr: float
    warmup: int = 200
    ema: float = 0.999
    class_dropout: float = 0.1
    weight_decay: float = 0.01


DEFAULTS = {
    "flux-shapes": TrainSettings(steps=3000, batch=48, lr=1e-3),
    "wan-moving": TrainSettings(steps=3500, batch=32, lr=1.5e-3),
}
SEED = 20261122


def _batch(name: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    spec = get_reference_spec(name)
    labels = torch.randint(0, len(spec.classes), (n,), generator=g)
    pixels = make_images(labels, g) if spec.kind == "image" else make_videos(labels, g)
    return pixels, labels


def train(name: str, out: Path, *, seed: int = SEED, steps: int | None = None, log_every: int = 100) -> ReferenceModel:
    """Train reference model `name` and save it into `out`; returns the EMA model."""
    spec = get_reference_spec(name)
    settings = DEFAULTS[name]
    if steps is not None:
        settings = TrainSettings(**{**settings.__dict__, "steps": steps})
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ReferenceModel(spec).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.99),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    start = time.perf_counter()
    running = None
    for step in range(settings.steps):
        pixels, labels = _batch(name, settings.batch, g)
        drop = torch.rand(labels.shape, generator=g) < settings.class_dropout
        labels = torch.where(drop, torch.full_like(labels, -1), labels)
        x0 = model.encode(pixels)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(labels.shape, generator=g))  # logit-normal(0, 1)
        tt = t.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - tt) * x0 + tt * noise
        loss = torch.nn.functional.mse_loss(model.velocity(xt, t, labels), noise - x0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(settings.ema, (step + 1) / (step + 10))
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - d)
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            logger.info("%s step %d/%d loss %.4f (%.0f s)", name, step + 1, settings.steps, running, elapsed)
    seconds = time.perf_counter() - start
    meta = {
        "trained_by": f"python -m hookwise.zoo.train {name}",
        "seed": seed,
        "settings": settings.__dict__,
        "final_loss_ema": running,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in ema.transformer.parameters()),
    }
    ema.save(out, meta)
    logger.info("%s: saved to %s after %.0f s (loss %.4f)", name, out, seconds, running)
    return ema


def _train_all(args: argparse.Namespace) -> int:
    """Every reference model at once, one process each (one thread each unless `--threads` says
    otherwise): on a 2-core machine both train in about the time of the slower one (~26 min)."""
    procs = []
    for name in reference_names():
        cmd = [sys.executable, "-m", "hookwise.zoo.train", name, "--out", str(args.out), "--seed", str(args.seed),
               "--threads", str(args.threads or 1)]
        if args.steps is not None:
            cmd += ["--steps", str(args.steps)]
        if args.grid is not None:
            cmd += ["--grid", str(args.grid)]
        procs.append((name, subprocess.Popen(cmd)))
    failed = [name for name, proc in procs if proc.wait() != 0]
    if failed:
        logger.error("training failed for %s (see the log above)", ", ".join(failed))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hookwise.zoo.train", description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=[*reference_names(), "all"])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="parent folder (default: the package's weights)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--grid", type=Path, default=None, help="also save a sample grid PNG into this folder")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.model == "all":
        return _train_all(args)
    name = args.model
    model = train(name, args.out / name, seed=args.seed, steps=args.steps)
    if args.grid is not None:
        path = save_sample_grid(model, args.grid / f"{name}-samples.png")
        logger.info("%s: sample grid in %s", name, path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
