"""The machine a plan is for: GPU, VRAM, RAM, pinned-memory limit, bandwidths, compute rate.

`Hardware.detect()` reads this machine (the host -> device bandwidth from a short probe, cached per
machine in the hookwise cache folder); every value can be given instead, to plan for a machine you
do not have: `Hardware.detect(vram="24GB", ram="64GB", h2d="25GB/s")`. A CPU-only machine plans for
a stated GPU (`gpu="RTX 4090"` or `vram=...`) or, with neither, for the CPU itself.

`fp8` says whether the compute device multiplies in fp8 (tensor cores of compute capability 8.9+:
Ada, Hopper, Blackwell): detected from this GPU's capability, or a named GPU's, or stated
(`fp8=True`, `hookwise plan --fp8`). Techniques read it to offer their fp8-compute variants.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from ..core.cost import kind_of, parse_rate, parse_size
from ..errors import ConfigError

logger = logging.getLogger("hookwise.plan.hardware")

GB = 10**9

# Dense bf16 matmul rates a DiT step reaches in practice (about 60% of the datasheet peak), and
# memory. Used when a GPU is named but not present; a stated `tflops=` wins.
# `capability` is the CUDA compute capability (fp8 matmul from 8.9).
KNOWN_GPUS: dict[str, dict[str, Any]] = {
    "rtx 3060": {"vram": 12 * 2**30, "tflops": 30, "capability": (8, 6)},
    "rtx 3090": {"vram": 24 * 2**30, "tflops": 50, "capability": (8, 6)},
    "rtx 4060 ti": {"vram": 16 * 2**30, "tflops": 45, "capability": (8, 9)},
    "rtx 4070": {"vram": 12 * 2**30, "tflops": 60, "capability": (8, 9)},
    "rtx 4080": {"vram": 16 * 2**30, "tflops": 100, "capability": (8, 9)},
    "rtx 4090": {"vram": 24 * 2**30, "tflops": 130, "capability": (8, 9)},
    "rtx 5090": {"vram": 32 * 2**30, "tflops": 170, "capability": (12, 0)},
    "a100": {"vram": 80 * 2**30, "tflops": 190, "capability": (8, 0)},
    "l40s": {"vram": 48 * 2**30, "tflops": 180, "capability": (8, 9)},
    "h100": {"vram": 80 * 2**30, "tflops": 450, "capability": (9, 0)},
    "h200": {"vram": 141 * 2**30, "tflops": 450, "capability": (9, 0)},
}
FP8_CAPABILITY = (8, 9)  # the first CUDA generation with fp8 tensor cores (Ada)
DEFAULT_GPU_TFLOPS = 100.0  # an unknown GPU: a mid-range card
DEFAULT_CPU_TFLOPS = 0.5
DEFAULT_H2D = 12 * GB  # PCIe 4.0 x16 with pageable copies, measured ~12-25 GB/s
DEFAULT_DISK_READ = 2 * GB  # an NVMe SSD
DEFAULT_LINK = 25 * GB  # between GPUs without NVLink: PCIe 4.0 x16 (NVLink: state it, e.g. --link 300GB/s)


@dataclass(frozen=True)
class Hardware:
    """One machine, as the planner sees it. Bytes and bytes per second; `assumed` names the values
    that were neither measured nor given."""

    device: str  # "cuda" or "cpu": where the model computes
    name: str
    vram: int  # total memory of the compute device (RAM for the CPU)
    vram_free: int
    ram: int  # host RAM available for weights
    pinned_limit: int  # host bytes that may be page-locked
    h2d: float  # host -> device bytes per second
    disk_read: float  # disk read bytes per second
    tflops: float  # the dense matmul rate a step reaches
    assumed: tuple[str, ...] = field(default=())
    shared: bool = False  # the device's memory is the host RAM (planning for the CPU itself)
    capability: tuple[int, int] | None = None  # CUDA compute capability, where known
    fp8: bool = False  # the compute device multiplies in fp8 (capability 8.9+, or stated)
    gpus: int = 1  # how many of these devices a run uses (ranks under torchrun); the parallel techniques need > 1
    link: float = float(DEFAULT_LINK)  # bytes per second each GPU sends to the others

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["assumed"] = list(self.assumed)
        out["capability"] = list(self.capability) if self.capability else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hardware:
        data = dict(data)
        data["assumed"] = tuple(data.get("assumed", ()))
        if data.get("capability") is not None:
            data["capability"] = tuple(data["capability"])
        return cls(**data)

    def describe(self) -> str:
        """One line for people."""
        gib = 1 / 2**30
        return (
            f"{self.name} ({self.device}): {self.vram * gib:.1f} GiB device memory, {self.ram * gib:.1f} GiB RAM, "
            f"host->device {self.h2d / GB:.1f} GB/s, disk {self.disk_read / GB:.1f} GB/s, ~{self.tflops:g} TFLOP/s"
            + (", fp8 matmul" if self.fp8 else "")
            + (f", {self.gpus} GPUs linked at {self.link / GB:.0f} GB/s" if self.gpus > 1 else "")
            + (f" (assumed: {', '.join(self.assumed)})" if self.assumed else "")
        )

    @classmethod
    def detect(
        cls,
        *,
        gpu: str | None = None,
        vram: int | str | None = None,
        ram: int | str | None = None,
        h2d: float | str | None = None,
        disk_read: float | str | None = None,
        pinned_limit: int | str | None = None,
        tflops: float | None = None,
        device: str | None = None,
        probe: bool = True,
        fp8: bool | None = None,
        gpus: int | None = None,
        link: float | str | None = None,
    ) -> Hardware:
        """This machine, with any value given replacing what would be measured.

        `gpu` names a GPU to plan for (its memory and rate from a small table); `device="cpu"` plans
        for computing on the CPU. `probe=False` skips the bandwidth probe (defaults are used instead
        unless a cached measurement exists). `fp8` states whether the device has fp8 matmul (None:
        from the GPU's compute capability, this one's or the named one's; unknown counts as no).
        `gpus`: how many such devices the run uses (None: the ranks of an initialised torch.distributed,
        else 1); `link`: bytes per second between them (e.g. "300GB/s"; default PCIe's, assumed).
        """
        assumed: list[str] = []
        cuda = torch.cuda.is_available()
        if device is None:
            device = "cuda" if (cuda or gpu is not None or vram is not None) else "cpu"
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"device={device!r}: plan for 'cuda' (a GPU) or 'cpu'")
        known = _known_gpu(gpu) if gpu else None
        if gpu and known is None and vram is None:
            raise ConfigError(
                f"gpu={gpu!r} is not one hookwise knows ({', '.join(sorted(KNOWN_GPUS))}); "
                f"state its memory with vram='24GB' (and tflops= for its rate)"
            )
        host = psutil.virtual_memory()
        ram_bytes = parse_size(ram, "ram") if ram is not None else int(host.available)
        capability = None
        if device == "cuda" and cuda and gpu is None:
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            name = props.name
            free, total = torch.cuda.mem_get_info()
            known = _known_gpu(name)
            capability = (int(props.major), int(props.minor))
        elif device == "cuda":
            name = gpu or "GPU"
            total = int(known["vram"]) if known else 0
            free = total
        else:
            name = _cpu_name()
            total = int(host.total)
            free = ram_bytes
        if vram is not None:
            total = free = parse_size(vram, "vram")
        if device == "cuda" and total <= 0:
            raise ConfigError("no GPU here to measure: state the one to plan for with vram='24GB' (or gpu='RTX 4090')")
        if tflops is None:
            if known:
                tflops = float(known["tflops"])
                assumed.append(f"compute rate (typical of a {name})")
            else:
                tflops = DEFAULT_GPU_TFLOPS if device == "cuda" else DEFAULT_CPU_TFLOPS
                assumed.append("compute rate")
        elif not tflops > 0:
            raise ConfigError(f"tflops={tflops!r} must be positive")
        if h2d is not None:
            rate = parse_rate(h2d, "h2d")
        elif device == "cpu":
            rate = float("inf")  # nothing crosses a bus when the CPU computes
        else:
            measured = _cached_probe(name) if cuda and gpu is None else None
            if measured is None and probe and cuda and gpu is None:
                measured = _probe_h2d()
                _store_probe(name, measured)
            if measured is None:
                measured = float(DEFAULT_H2D)
                assumed.append("host->device bandwidth")
            rate = measured
        if disk_read is not None:
            disk = parse_rate(disk_read, "disk_read")
        else:
            disk = float(DEFAULT_DISK_READ)
            assumed.append("disk read speed")
        pinned = parse_size(pinned_limit, "pinned_limit") if pinned_limit is not None else ram_bytes // 2
        if capability is None and known is not None and device == "cuda":
            capability = tuple(known["capability"])
        if fp8 is not None and not isinstance(fp8, bool):
            raise ConfigError(f"fp8={fp8!r}: use True (the device has fp8 matmul), False, or None (detect)")
        if fp8 is None:
            fp8 = device == "cuda" and capability is not None and capability >= FP8_CAPABILITY
            if device == "cuda" and capability is None:
                assumed.append("no fp8 matmul (compute capability unknown; --fp8 states it)")
        if gpus is None:
            import torch.distributed as dist

            gpus = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise ConfigError(f"gpus={gpus!r}: how many devices the run uses, a whole number >= 1")
        if link is not None:
            link_rate = parse_rate(link, "link")
        else:
            link_rate = float(DEFAULT_LINK)
            if gpus > 1:
                assumed.append("inter-GPU bandwidth (PCIe; --link states NVLink's)")
        return cls(
            device=device,
            name=name,
            vram=int(total),
            vram_free=int(free),
            ram=int(ram_bytes),
            pinned_limit=int(pinned),
            h2d=float(rate),
            disk_read=float(disk),
            tflops=float(tflops),
            assumed=tuple(assumed),
            shared=device == "cpu" and vram is None,
            capability=capability,
            fp8=fp8,
            gpus=gpus,
            link=link_rate,
        )

    @property
    def kind(self) -> str:
        """The device kind speed figures are keyed by (`core.cost.device_kind`): a GPU of the known table by
        the table's name, "cuda:h100" whether stated (gpu="H100") or detected ("NVIDIA H100 80GB HBM3");
        any other device by its name, lower-cased ("cpu:amd epyc (2 cores)")."""
        known = known_gpu_name(self.name) if self.device == "cuda" else None
        return kind_of(self.device, known or self.name)

    def with_(self, **changes: Any) -> Hardware:
        return replace(self, **changes)


def _cpu_name() -> str:
    """This CPU's model and the cores this process may use, e.g. "AMD EPYC (2 cores)": speed figures
    measured on a CPU hold for that kind (`core.cost.device_kind`)."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)" if cores else model


@functools.lru_cache(maxsize=64)  # read for every speed technique of every stack a plan enumerates
def known_gpu_name(name: str | None) -> str | None:
    """The `KNOWN_GPUS` entry a GPU name is ("NVIDIA H100 80GB HBM3", "H100", "h100 sxm" -> "h100"), or None:
    the longest table name found in it as whole words ("RTX 4060 Ti" is not an "rtx 4060")."""
    if not name:
        return None
    key = " ".join(name.lower().replace("nvidia", " ").replace("geforce", " ").split())
    found = [k for k in KNOWN_GPUS if re.search(rf"(?<![a-z0-9]){re.escape(k)}(?![a-z0-9])", key)]
    return max(found, key=len) if found else None


def _known_gpu(name: str | None) -> dict[str, Any] | None:
    known = known_gpu_name(name)
    return KNOWN_GPUS[known] if known else None


def cache_dir() -> Path:
    """The hookwise cache folder ($XDG_CACHE_HOME/hookwise, else ~/.cache/hookwise)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hookwise"


def _probe_file() -> Path:
    return cache_dir() / "hardware.json"


def _probe_key(name: str) -> str:
    return f"{platform.node()}|{name}|torch {torch.__version__}"


def _cached_probe(name: str) -> float | None:
    try:
        data = json.loads(_probe_file().read_text())
        return float(data[_probe_key(name)]["h2d"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_probe(name: str, rate: float) -> None:
    path = _probe_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[_probe_key(name)] = {"h2d": rate, "when": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    except OSError as exc:  # a read-only home: measure again next time
        logger.info("hookwise: could not cache the bandwidth probe in %s: %s", path, exc)


def _probe_h2d(nbytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Host -> device bytes per second from pinned memory (what prefetching uses), best of a few copies."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del src, dst
    return nbytes / best
