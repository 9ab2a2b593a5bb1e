"""The README's examples run as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import torch

import hookwise
from model_helpers import tiny_flux, tiny_wan

README = Path(__file__).resolve().parent.parent / "README.md"
PYPROJECT = README.parent / "pyproject.toml"


def _block_after(heading: str) -> str:
    """The first ```python block after the line `heading`."""
    text = README.read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def test_the_writing_a_hook_example_runs_on_flux_and_wan_blocks():
    code = _block_after("Writing a hook:")
    for build, tower in ((tiny_flux, "transformer_blocks"), (tiny_wan, "blocks")):
        model, inputs = build()
        model.eval()
        with torch.no_grad():
            plain = model(**inputs, return_dict=False)[0]
            # The example hooks `transformer.transformer_blocks[0]`; Wan names its tower `blocks`.
            namespace = {"transformer": model}
            exec(code.replace("transformer_blocks", tower), namespace)
            scaled = model(**inputs, return_dict=False)[0]
        assert hookwise.list_hooks(getattr(model, tower)[0]) == {"": ["scale"]}
        assert torch.isfinite(scaled).all() and not torch.allclose(scaled, plain)
        hookwise.remove_hook(getattr(model, tower)[0], "scale")
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs, return_dict=False)[0], plain, rtol=0, atol=0)


def test_the_quick_start_installs_an_extra_that_exists_and_runs_the_demo_then_the_tests():
    from hookwise.cli import build_parser, cmd_demo

    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("## Quick start") :], re.S).group(1)
    first, second = block.strip().splitlines()
    match = re.fullmatch(r'pip install torch==2\.13\.0 && pip install -e "\.\[(\w+)\]" && hookwise demo', first)
    assert match, first
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extra = project["optional-dependencies"][match.group(1)]
    names = {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() for req in extra}
    assert {"diffusers", "peft", "pillow"} <= names  # the zoo model, the LoRA, the PNG
    assert project["scripts"]["hookwise"] == "hookwise.cli:main"
    assert build_parser().parse_args(["demo"]).func is cmd_demo  # no arguments needed
    assert second == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
