"""KL coefficient controllers: fixed, or adaptive toward a target KL per completion.

Two adaptive rules (`kl.controller`):

ziegler  (Ziegler et al. 2019, section 2.2) a proportional, clipped error, applied multiplicatively:
             e = clip(KL / target - 1, -0.2, 0.2),  coef <- coef * (1 + e * n / horizon)
         after each batch of n completions. The coefficient can move by at most a factor
         (1 + 0.2 n / horizon) per step: with 64 completions a step and horizon 2000 that is e^0.0064, so
         e^0.64 (x1.9) over 100 steps. Built for runs of ~10^5 completions; in a 100-step run it cannot
         follow a KL that climbs from 2 to 10 nats.

pi       (the default) a proportional-integral controller on log(coef), treating the coefficient as the
         Lagrange multiplier of the constraint KL <= target and updating it by dual ascent (Stooke,
         Achiam and Abbeel 2020, "Responsive Safety in RL by PID Lagrangian Methods"); in log space, as the
         PPO paper's adaptive penalty (Schulman et al. 2017, section 4) moves it by factors:
             e_t = clip(log(KL_t / target), -0.2, 1)
             log coef_t = log coef_0 + kp * e_t + ki * sum_{s<=t} e_s
         The log error is scale free, so one pair of gains serves any target; the integral term removes
         the steady-state error that a proportional rule leaves, and the proportional term damps the lag
         of the policy's response. With ki = 0.1 the coefficient can rise by e^0.1 a step, e^10 over 100
         steps. The clip is asymmetric, against integral wind-up: KL below target early in a run mostly
         means the policy has not moved yet (no coefficient makes it move faster than its learning rate
         lets it), so lowering the coefficient fast there only stores up a small coefficient that lets
         the KL overshoot later (measured in the demo: a symmetric clip of +-1 took the coefficient from
         0.2 to 0.017 in 20 steps, then the KL overshot to 17 nats for a target of 8); KL above target is
         what the penalty is for, so it reacts fast. The clip also keeps one noisy batch (or the KL of ~0
         at the first step, whose log is -inf) from throwing the coefficient far.
"""
from __future__ import annotations

import math
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
    """Ziegler et al.'s proportional rule (see the module docstring)."""

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        super().__init__(coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


class PIKLController(FixedKLController):
    """Proportional-integral control of log(coef) toward a target KL (see the module docstring)."""

    LOW, HIGH = -0.2, 1.0  # clip of the log error (see the module docstring: anti-windup below target)

    def __init__(self, coef: float, target: float, kp: float, ki: float) -> None:
        super().__init__(coef)
        self.coef0, self.target, self.kp, self.ki = float(coef), float(target), float(kp), float(ki)
        self.integral = 0.0  # ki * sum of the errors so far

    def error(self, current_kl: float) -> float:
        # A KL <= 0 (a k1 batch mean at the start can be) is "far below target": the clip's floor.
        if current_kl <= 0:
            return self.LOW
        return min(max(math.log(current_kl / self.target), self.LOW), self.HIGH)

    def update(self, current_kl: float, n_samples: int) -> None:
        e = self.error(current_kl)
        self.integral += self.ki * e
        self.value = self.coef0 * math.exp(self.kp * e + self.integral)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "integral": self.integral}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.integral = float(state.get("integral", math.log(self.value / self.coef0)))


def make_kl_controller(kcfg: Any) -> FixedKLController:
    """From a KLConfig: fixed without a target, else its `controller`."""
    if kcfg.target <= 0:
        return FixedKLController(kcfg.coef)
    if kcfg.controller == "ziegler":
        return AdaptiveKLController(kcfg.coef, kcfg.target, kcfg.horizon)
    return PIKLController(kcfg.coef, kcfg.target, kcfg.kp, kcfg.ki)
