"""Controllers for the KL coefficient β of PPO's reward (Ziegler et al. 2019, §2.2).

Both controllers share one interface, :class:`KLController`, so a phase can hold either: read ``.beta``, call
``.update(kl, n_steps)`` after each rollout batch, and save/restore ``state_dict()`` with the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


class KLController(Protocol):
    beta: float

    def update(self, kl: float | Tensor, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class FixedKLController:
    """A constant β; ``update`` is a no-op, kept so phases treat both controllers alike."""

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, kl: float | Tensor, n_steps: int) -> None:
        """Ignore the observed KL: β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Proportional control of β towards a KL target (Ziegler et al. 2019, §2.2):

        e = clip(kl / target − 1, −0.2, 0.2);   β ← β · (1 + e · n_steps / horizon)

    ``kl`` is the observed KL(π‖π_ref) per sequence of the last batch, ``n_steps`` the number of samples (or
    steps) it covered, ``horizon`` how many such steps it takes to move β by a factor ~e.
    Only β is state: ``target`` and ``horizon`` come from the configuration of the resumed run.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive; got target={target}, horizon={horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, kl: float | Tensor, n_steps: int) -> None:
        proportional_error = min(max(float(kl) / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


@dataclass(frozen=True)
class KLControlConfig:
    """How PPO sets β, the KL penalty's coefficient (``--model.kl_control.beta``): fixed, or adapted towards a target
    KL when ``target`` is set.

    Args:
        beta: β per nat of KL on each token; the starting value when ``target`` is set
        target: KL(π‖π_ref) per sequence that the adaptive controller steers towards; None keeps β fixed
        horizon: samples over which the adaptive controller moves β by a factor of about 1.2
    """

    beta: float = 0.05
    target: float | None = None
    horizon: float = 10000

    def controller(self) -> KLController:
        """The controller these settings describe."""
        if self.target is None:
            return FixedKLController(self.beta)
        return AdaptiveKLController(self.beta, self.target, self.horizon)
