"""The step load plan: N users for T seconds, then the next N. No locust import (unit-tested alone)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STEPS = "1,2,4,8,16,32,64,128,256"


def parse_steps(spec: str) -> tuple[int, ...]:
    """"1,4,16" -> (1, 4, 16): user counts of the stages, each > 0."""
    try:
        steps = tuple(int(s) for s in str(spec).split(",") if s.strip())
    except ValueError:
        raise ValueError(f"bad steps {spec!r}: user counts like 1,4,16,64") from None
    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"bad steps {spec!r}: user counts like 1,4,16,64 (each >= 1)")
    return steps


@dataclass(frozen=True)
class StepPlan:
    steps: tuple[int, ...]
    step_time: float  # seconds each stage holds its user count
    ramp: float = 1.0  # seconds to go from one stage's users to the next

    def __post_init__(self) -> None:
        if self.step_time <= 0:
            raise ValueError(f"step time must be > 0, not {self.step_time}")
        if self.ramp < 0:
            raise ValueError(f"step ramp must be >= 0, not {self.ramp}")

    @property
    def duration(self) -> float:
        return self.step_time * len(self.steps)

    def tick(self, run_time: float) -> tuple[int, float] | None:
        """(users, spawn rate per second) at `run_time` seconds into the test; None when the plan is over."""
        stage = int(run_time // self.step_time)
        if stage >= len(self.steps):
            return None
        users = self.steps[stage]
        previous = self.steps[stage - 1] if stage else 0
        delta = max(abs(users - previous), 1)
        return users, delta / max(self.ramp, 0.01)
