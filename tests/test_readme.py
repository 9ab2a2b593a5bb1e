"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import hookwise
from model_helpers import tiny_flux, tiny_wan

README = Path(__file__).resolve().parent.parent / "README.md"


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
