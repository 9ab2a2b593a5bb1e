"""`hookwise demo --fast`: the README's first command, in a few training and sampling steps."""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from hookwise.cli import main


def test_demo_fast_trains_samples_cached_and_uncached_and_writes_one_table_and_a_png(tmp_path, capsys):
    threads = torch.get_num_threads()
    png = tmp_path / "demo.png"
    assert main(["demo", "--fast", "--out", str(tmp_path / "run"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the demo's thread setting does not outlive it
    assert out.count("PSNR vs exact") == 1  # one table
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 3 and "train LoRA, 8 steps" in rows[0] and "uncached" in rows[1] and "exact" in rows[1]
    cached = rows[2].split("│")
    assert re.fullmatch(r"\s*\d+\.\d\s*", cached[-2]), rows[2]  # a measured PSNR: the cache skipped work
    assert png.is_file() and f"samples side by side: {png}" in out
    weights = load_file(str(tmp_path / "run" / "lora-diffusers.safetensors"))
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in weights.items())
    for fmt in ("peft", "kohya", "bfl"):
        assert (tmp_path / "run" / f"lora-{fmt}.safetensors").is_file()
