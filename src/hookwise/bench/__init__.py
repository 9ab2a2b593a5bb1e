"""Harnesses behind `hookwise bench ...`; they sit on the stack and the techniques.

`hookwise bench cache`, the quality harness of the step caches, in three parts:
`methods` (what is run: each hookwise cache over a sweep of settings, and diffusers' caches at
equal settings), `run` (`run_cache_bench`: one process, one loaded reference model; evaluations
counted per sample by `SampleCounter` hooks, time, PSNR / SSIM against the uncached samples) and
`report` (the Markdown table, the quality plot, and the comparison with diffusers at equal work).
"""

from .methods import DIFFUSERS_METHODS, HOOKWISE_METHODS, Method, diffusers_methods, hookwise_methods
from .report import best_at_work, best_at_work_markdown, compare_at_equal_work, comparison_markdown, save_plot, to_markdown
from .run import RunResult, SampleCounter, run_cache_bench

__all__ = [
    "DIFFUSERS_METHODS",
    "HOOKWISE_METHODS",
    "Method",
    "RunResult",
    "SampleCounter",
    "best_at_work",
    "best_at_work_markdown",
    "compare_at_equal_work",
    "comparison_markdown",
    "diffusers_methods",
    "hookwise_methods",
    "run_cache_bench",
    "save_plot",
    "to_markdown",
]
