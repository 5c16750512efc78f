"""KL coefficient controllers: fixed, or adaptive toward a target KL (Ziegler et al. 2019, section 2.2).

The adaptive rule moves the coefficient by a proportional, clipped error:
    e = clip(KL / target - 1, -0.2, 0.2),  coef <- coef * (1 + e * n / horizon)
after each batch of n completions, so KL above target raises the penalty and KL below lowers it.
"""
from __future__ import annotations

from typing import Any


class FixedKLController:
    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    def __init__(self, coef: float, target: float, horizon: int) -> None:
        super().__init__(coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


def make_kl_controller(kcfg: Any) -> FixedKLController:
    """From a KLConfig: adaptive when a target is set, else fixed."""
    if kcfg.target > 0:
        return AdaptiveKLController(kcfg.coef, kcfg.target, kcfg.horizon)
    return FixedKLController(kcfg.coef)
