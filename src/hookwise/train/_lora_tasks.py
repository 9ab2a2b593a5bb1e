"""What the LoRA trainer learns from (machinery of `trainer.py`; private).

A *task* gives the trainer its transformer, batches of clean latents with the transformer's keyword
arguments, any extra trainable tensors, validation samples, and the files kept next to the LoRA:

- `ZooTask`: a `hookwise.zoo` reference model learning a class it never saw
  (`zoo.data.NEW_IMAGE_CLASS`), with a new row of its class-embedding "text encoder" trained
  alongside the LoRA. Part of each batch is the old classes (prior preservation), so the LoRA adds
  a class rather than replacing the others. It also measures whether the class was learned.
- `LatentsTask`: any diffusers transformer, with its latents and conditioning cached on disk (a
  folder of safetensors files written by `save_latents`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.outputs import sample_of
from ..errors import ConfigError
from ..sampling.flow import sample
from ..zoo.data import IMAGE_CLASSES, NEW_IMAGE_CLASS, make_images, make_new_class_images
from ..zoo.reference import ReferenceModel

EMBEDDING_FILE = "embedding.safetensors"
LATENTS_KEY = "latents"
_TIMESTEP_SCALE_KEY = "hookwise_timestep_scale"
_ARGS_KEY = "hookwise_arguments"  # the names of the model's latents and timestep arguments


class ZooTask:
    """A zoo reference model (images) learning `NEW_IMAGE_CLASS` through a LoRA and a new embedding row."""

    kind = "zoo"

    def __init__(self, reference: ReferenceModel, *, prior: float = 0.25, sample_steps: int = 20) -> None:
        if reference.spec.kind != "image":
            raise ConfigError(
                f"the LoRA trainer teaches image reference models a new class; {reference.spec.name} is a "
                "video model. Use flux-shapes, or cache latents of your own data (hookwise.train.save_latents)."
            )
        if not 0.0 <= prior < 1.0:
            raise ConfigError(f"prior={prior!r}: the share of old-class samples per batch must be in [0, 1)")
        self.reference = reference
        self.transformer = reference.transformer
        self.timestep_scale = reference.spec.timestep_scale
        self.prior = prior
        self.sample_steps = sample_steps
        self.class_name = NEW_IMAGE_CLASS
        null = reference.null_class
        # The new prompt starts as the mean of the known ones: "some shape", not the empty prompt.
        self.tokens = nn.Parameter(reference.class_tokens[:null].detach().mean(0).clone())
        pooled = reference.class_pooled
        self.pooled = nn.Parameter(pooled[:null].detach().mean(0).clone()) if pooled is not None else None
        self.new_label = null + 1  # after the empty prompt in the extended table

    # ---- trainable extras and their file ----------------------------------------------------------
    def shared_keys(self) -> set[str]:
        """Keyword arguments of `batch` that are the same for every sample (not split over data-parallel ranks)."""
        return {"img_ids", "txt_ids"} if self.reference.spec.pack else set()

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.tokens, self.pooled) if p is not None]

    def save(self, folder: Path) -> Path:
        tensors = {"class_tokens": self.tokens.detach().contiguous()}
        if self.pooled is not None:
            tensors["class_pooled"] = self.pooled.detach().contiguous()
        meta = {"class": self.class_name, "reference": self.reference.spec.name}
        path = folder / EMBEDDING_FILE
        save_file(tensors, str(path), metadata={"hookwise_embedding": json.dumps(meta)})
        return path

    def load(self, folder: Path) -> None:
        tensors = load_file(str(folder / EMBEDDING_FILE))
        with torch.no_grad():
            self.tokens.copy_(tensors["class_tokens"])
            if self.pooled is not None:
                self.pooled.copy_(tensors["class_pooled"])

    def to(self, device: torch.device) -> None:
        self.reference.to(device)
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.to(device)

    # ---- data -------------------------------------------------------------------------------------
    def call(self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The model's velocity prediction."""
        return model(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]

    def conditioning(self, labels: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Keyword arguments for class ids `labels`: old ids, -1 for the empty prompt, `new_label` for the new class."""
        ref = self.reference
        labels = torch.where(labels < 0, torch.full_like(labels, ref.null_class), labels).to(ref.class_tokens.device)
        tokens = torch.cat([ref.class_tokens, self.tokens[None]])
        out = {"encoder_hidden_states": tokens[labels].to(dtype)}
        if self.pooled is not None:
            out["pooled_projections"] = torch.cat([ref.class_pooled, self.pooled[None]])[labels].to(dtype)
        if ref.spec.pack:
            out["img_ids"], out["txt_ids"] = ref.img_ids, ref.txt_ids
        return out

    def batch(self, n: int, g: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
        old = int(round(self.prior * n))
        new = n - old
        old_labels = torch.randint(0, self.reference.null_class, (old,), generator=g)
        pixels = torch.cat([make_new_class_images(new, g), make_images(old_labels, g)])
        labels = torch.cat([torch.full((new,), self.new_label), old_labels])
        device = self.reference.class_tokens.device
        return self.reference.encode(pixels).to(device), self.conditioning(labels, dtype)

    def example_inputs(self, n: int, dtype: torch.dtype) -> dict[str, Any]:
        """One call's keyword arguments (for the planner)."""
        g = torch.Generator().manual_seed(0)
        x0, cond = self.batch(n, g, dtype)
        return {"hidden_states": x0.to(dtype), "timestep": torch.full((n,), 0.5 * self.timestep_scale), **cond}

    # ---- sampling and the measure of learning ----------------------------------------------------
    def sample(self, model: nn.Module, labels: Sequence[int], *, seed: int = 0, steps: int | None = None) -> torch.Tensor:
        """Pixels in [0, 1] for `labels` (use `new_label` for the new class), with guidance."""
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        dtype = next(self.transformer.parameters()).dtype
        noise = self.reference.noise(labels.shape[0], torch.Generator().manual_seed(seed)).to(dtype)
        latents = sample(
            model, noise, self.conditioning(labels, dtype), self.conditioning(torch.full_like(labels, -1), dtype),
            steps=steps or self.sample_steps, guidance_scale=self.reference.spec.guidance_scale,
            timestep_scale=self.timestep_scale,
        )  # fmt: skip
        return self.reference.decode(latents)

    def validation_labels(self, per_class: int = 4) -> tuple[list[int], list[str]]:
        """Labels of a validation grid (the new class, then two old ones for comparison) and row names."""
        classes = [(self.new_label, self.class_name), (0, IMAGE_CLASSES[0]), (4, IMAGE_CLASSES[4])]
        labels = [c for c, _ in classes for _ in range(per_class)]
        return labels, [name for _, name in classes]


def class_distances(pixels: torch.Tensor, *, bank: int = 512, seed: int = 1234) -> tuple[float, float]:
    """(mean distance to the new class's data, mean distance to the old classes' data) of image samples.

    Each sample's distance to a set is the root-mean-square pixel difference (pixels in [0, 1]) to
    its nearest neighbour among `bank` fresh draws of that set; a sample of the new class is close
    to the first set and far from the second.
    """
    g = torch.Generator().manual_seed(seed)
    new = (make_new_class_images(bank, g) + 1) / 2
    old = (make_images(torch.randint(0, len(IMAGE_CLASSES), (bank,), generator=g), g) + 1) / 2
    x = pixels.detach().float().cpu().flatten(1)

    def nearest(data: torch.Tensor) -> float:
        d = torch.cdist(x.double(), data.flatten(1).double()) / x.shape[1] ** 0.5
        return float(d.min(dim=1).values.mean())

    return nearest(new), nearest(old)


class LatentsTask:
    """A diffusers transformer with its latents and conditioning cached on disk (`save_latents` files)."""

    kind = "latents"

    def __init__(self, transformer: nn.Module, folder: str | Path, *, timestep_scale: float | None = None,
                 sample_steps: int = 20) -> None:  # fmt: skip
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not files:
            raise ConfigError(f"no cached latents in {folder}: expected safetensors files written by hookwise.train.save_latents")
        self.transformer = transformer
        self.sample_steps = sample_steps
        self.class_name = None
        per_sample: dict[str, list[torch.Tensor]] = {}
        shared: dict[str, torch.Tensor] = {}
        scales, arguments = set(), set()
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if LATENTS_KEY not in tensors:
                raise ConfigError(f"{path} has no {LATENTS_KEY!r} tensor; write the files with hookwise.train.save_latents")
            scales.add(float(meta.get(_TIMESTEP_SCALE_KEY, "1.0")))
            arguments.add(meta.get(_ARGS_KEY, "hidden_states,timestep"))
            n = tensors[LATENTS_KEY].shape[0]
            for key, value in tensors.items():
                if key.startswith("shared."):
                    name = key.removeprefix("shared.")
                    if name in shared and not torch.equal(shared[name], value):
                        raise ConfigError(f"{path}: shared tensor {name!r} differs from the other files'; cache one folder per layout")
                    shared[name] = value
                elif value.shape[0] != n:
                    raise ConfigError(f"{path}: {key!r} has {value.shape[0]} rows, the latents {n}; per-sample tensors need one row each")
                else:
                    per_sample.setdefault(key, []).append(value)
        if len(scales) > 1 or len(arguments) > 1:
            raise ConfigError(f"{folder}: files disagree on the timestep scale or argument names "
                              f"({sorted(scales)}, {sorted(arguments)}); cache them again")  # fmt: skip
        self.input_arg, self.timestep_arg = arguments.pop().split(",")
        self.timestep_scale = timestep_scale if timestep_scale is not None else scales.pop()
        try:
            self.data = {k: torch.cat(v) for k, v in per_sample.items()}
        except RuntimeError as exc:
            raise ConfigError(f"{folder}: cached tensors of different shapes cannot be batched ({exc})") from exc
        missing = [k for k in self.data if len(per_sample[k]) != len(files)]
        if missing:
            raise ConfigError(f"{folder}: {missing} are missing from some files; every file needs the same tensors")
        self.shared = shared
        self.size = self.data[LATENTS_KEY].shape[0]

    def shared_keys(self) -> set[str]:
        """Keyword arguments of `batch` that are the same for every sample (not split over data-parallel ranks)."""
        return set(self.shared)

    def parameters(self) -> list[nn.Parameter]:
        return []

    def save(self, folder: Path) -> None:
        return None

    def load(self, folder: Path) -> None:
        return None

    def to(self, device: torch.device) -> None:
        self.transformer.to(device)
        self.data = {k: v.to(device) for k, v in self.data.items()}
        self.shared = {k: v.to(device) for k, v in self.shared.items()}

    def call(self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The model's velocity prediction (a diffusers output, a tuple or a tensor)."""
        return sample_of(model(**{self.input_arg: x, self.timestep_arg: timestep}, **cond), "train_lora")

    def _rows(self, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
        device = self.data[LATENTS_KEY].device
        index = index.to(device)
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        cond = {k: cast(v[index]) for k, v in self.data.items() if k != LATENTS_KEY}
        cond.update({k: cast(v) for k, v in self.shared.items()})
        return self.data[LATENTS_KEY][index].float(), cond

    def batch(self, n: int, g: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._rows(torch.randint(0, self.size, (n,), generator=g), dtype)

    def example_inputs(self, n: int, dtype: torch.dtype) -> dict[str, Any]:
        x0, cond = self._rows(torch.arange(n) % self.size, dtype)
        return {self.input_arg: x0.to(dtype), self.timestep_arg: torch.full((n,), 0.5 * self.timestep_scale), **cond}

    def sample(self, model: nn.Module, labels: Sequence[int], *, seed: int = 0, steps: int | None = None) -> torch.Tensor:
        """Latents sampled with the conditioning of cached rows `labels` (no guidance: no empty prompt is cached)."""
        dtype = next(self.transformer.parameters()).dtype
        x0, cond = self._rows(torch.as_tensor(list(labels)), dtype)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device, dtype)

        def denoiser(hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return self.call(model, hidden_states, timestep, kwargs)

        return sample(denoiser, noise, cond, steps=steps or self.sample_steps, timestep_scale=self.timestep_scale).float()

    def validation_labels(self, per_class: int = 4) -> tuple[list[int], list[str]]:
        n = min(per_class, self.size)
        return list(range(n)), [f"cached rows 0-{n - 1}"]


def save_latents(path: str | Path, latents: torch.Tensor, *, timestep_scale: float = 1.0,
                 shared: dict[str, torch.Tensor] | None = None, input_arg: str = "hidden_states",
                 timestep_arg: str = "timestep", **conditioning: torch.Tensor) -> Path:  # fmt: skip
    """Cache training data for `hookwise.train_lora(model, data=FOLDER)`: one safetensors file.

    `latents` are clean latents in the transformer's `hidden_states` layout, one row per sample;
    `conditioning` the transformer's other keyword arguments, one row per sample
    (`encoder_hidden_states=...`); `shared` those that every call takes whole (FLUX's `img_ids`);
    `timestep_scale` what the model's `timestep` is in units of t in [0, 1] (1 for FLUX, 1000 for Wan);
    `input_arg`, `timestep_arg` the names of the model's latents and timestep arguments (diffusers':
    `hidden_states`, `timestep`).
    """
    tensors = {LATENTS_KEY: latents.detach().contiguous().cpu()}
    for key, value in conditioning.items():
        if value.shape[0] != latents.shape[0]:
            raise ConfigError(f"save_latents: {key} has {value.shape[0]} rows and latents {latents.shape[0]}; "
                              "pass tensors every call takes whole as shared={...}")  # fmt: skip
        tensors[key] = value.detach().contiguous().cpu()
    for key, value in (shared or {}).items():
        tensors[f"shared.{key}"] = value.detach().contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {_TIMESTEP_SCALE_KEY: repr(float(timestep_scale)), _ARGS_KEY: f"{input_arg},{timestep_arg}"}
    save_file(tensors, str(path), metadata=metadata)
    return path
