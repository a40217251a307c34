"""PPO's health: limits that a well-behaved run stays within at every iteration, and the breaches of a run.

Well-tuned PPO takes small steps: the approximate KL between the policy that sampled an iteration's rollouts and the
policy at each of its updates (``policy/approxkl``, averaged over the updates) stays near 0.01–0.02 and few tokens hit
the clip (Schulman et al. 2017; the 37 implementation details of
Huang et al. 2022). A policy that stops ending its answers, or whose KL to the reference jumps, has collapsed.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HealthLimits:
    """The limits of a healthy iteration.

    Args:
        approxkl: most ``policy/approxkl`` (the mean over the iteration's updates)
        clipfrac: most ``policy/clipfrac``
        eos_fraction: least ``rollout/response/eos_fraction``, the share of rollouts that end
        kl_spike: most ``objective/kl`` (the rollouts' KL to the reference) as a multiple of its median over the
            earlier iterations, once it exceeds ``kl_floor`` nats (a KL growing from 0 is no spike)
        kl_floor: nats of rollout KL below which no spike is called
    """

    approxkl: float = 0.02
    clipfrac: float = 0.10
    eos_fraction: float = 0.95
    kl_spike: float = 3.0
    kl_floor: float = 1.0


@dataclass
class PPOHealth:
    """Checks each iteration's metrics against :class:`HealthLimits` and keeps every breach, one line each."""

    limits: HealthLimits = field(default_factory=HealthLimits)
    breaches: list[str] = field(default_factory=list)
    rollout_kls: list[float] = field(default_factory=list)

    def check(self, iteration: int, metrics: Mapping[str, float]) -> list[str]:
        """The breaches of one iteration (also appended to :attr:`breaches`)."""
        limits, found = self.limits, []
        if (value := metrics.get("policy/approxkl")) is not None and value > limits.approxkl:
            found.append(f"iteration {iteration}: policy/approxkl {value:.3f} > {limits.approxkl}")
        if (value := metrics.get("policy/clipfrac")) is not None and value > limits.clipfrac:
            found.append(f"iteration {iteration}: policy/clipfrac {value:.3f} > {limits.clipfrac}")
        if (value := metrics.get("rollout/response/eos_fraction")) is not None and value < limits.eos_fraction:
            found.append(f"iteration {iteration}: rollout/response/eos_fraction {value:.3f} < {limits.eos_fraction}")
        if (kl := metrics.get("objective/kl")) is not None:
            median = statistics.median(self.rollout_kls) if self.rollout_kls else None
            if median is not None and kl > limits.kl_floor and kl > limits.kl_spike * median:
                found.append(f"iteration {iteration}: objective/kl {kl:.3f} > {limits.kl_spike} x the earlier "
                             f"iterations' median {median:.3f}")
            self.rollout_kls.append(kl)
        self.breaches.extend(found)
        return found

    def state_dict(self) -> dict:
        return {"breaches": list(self.breaches), "rollout_kls": list(self.rollout_kls)}

    def load_state_dict(self, state: Mapping) -> None:
        self.breaches, self.rollout_kls = list(state["breaches"]), list(state["rollout_kls"])
