"""Load shapes. Locust runs a `LoadTestShape` it finds in the locustfile's namespace, so
`locustfile.py` imports this one only when asked (`LOAD_SHAPE=steps`); it can also be given
as a second locustfile: `locust -f loadtest/locustfile.py,loadtest/shapes.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from locust import LoadTestShape

if __package__ in (None, ""):  # loaded by path, as a locustfile
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.stages import DEFAULT_STEPS, StepPlan, parse_steps  # noqa: E402


class StepLoadShape(LoadTestShape):
    """Stages of `--steps` users (default 1,2,4,...,256), each held `--step-time` seconds, then stop.

    Reads the locustfile's options (`--steps`, `--step-time`, `--step-ramp`), or the
    LOADTEST_STEPS / LOADTEST_STEP_TIME / LOADTEST_STEP_RAMP environment variables
    when used with another locustfile.
    """

    def __init__(self) -> None:
        super().__init__()
        self._plan: StepPlan | None = None

    def plan(self) -> StepPlan:
        if self._plan is None:
            opts = self.runner.environment.parsed_options if self.runner is not None else None
            steps = getattr(opts, "steps", None) or os.environ.get("LOADTEST_STEPS", DEFAULT_STEPS)
            step_time = getattr(opts, "step_time", None) or os.environ.get("LOADTEST_STEP_TIME", 15)
            ramp = getattr(opts, "step_ramp", None)
            if ramp is None:
                ramp = os.environ.get("LOADTEST_STEP_RAMP", 1)
            self._plan = StepPlan(parse_steps(steps), float(step_time), float(ramp))
        return self._plan

    def tick(self) -> tuple[int, float] | None:
        return self.plan().tick(self.get_run_time())
