"""The planner: measure -> predict -> choose -> apply -> verify (`hookwise.optimize`, `hookwise plan`).

Files: `job.py` (the job as data), `hardware.py` (the machine: probed or stated), `footprint.py`
(exact weight bytes from the model map, after each storage option), `estimate.py` (tokens, FLOPs,
activation and VAE bytes), `choose.py` (enumerating stacks from the technique table's cost
declarations, predicting, ranking, explaining), `plan.py` (`Plan`, `make_plan`, `optimize`).
`peak.py` runs a job on fake tensors for its peak memory. Private: `_measure.py` (the first real
step's measured peak).
"""

from .choose import GOALS, Option
from .hardware import Hardware
from .job import Job
from .plan import Plan, make_plan, optimize

__all__ = ["GOALS", "Hardware", "Job", "Option", "Plan", "make_plan", "optimize"]
