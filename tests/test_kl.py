"""KL coefficient controllers: hand-computed updates, resume, parse-time checks, and a simulated policy
whose KL must settle at the target."""
from __future__ import annotations

import math
import random

import pytest

from rlhfkit import config as C
from rlhfkit.rl.kl import AdaptiveKLController, FixedKLController, PIKLController, make_kl_controller


def test_pi_updates_by_hand():
    pi = PIKLController(0.2, target=8.0, kp=0.5, ki=0.1)
    pi.update(8.0 * math.exp(0.5), 64)  # e = 0.5: integral 0.05, log coef moves 0.5*0.5 + 0.05
    assert pi.value == pytest.approx(0.2 * math.exp(0.30))
    pi.update(0.0, 64)  # KL 0: the clip's floor e = -0.2; integral 0.05 - 0.02
    assert pi.value == pytest.approx(0.2 * math.exp(-0.1 + 0.03))
    pi.update(8.0 * math.exp(3.0), 64)  # e = 3 clipped to 1; integral 0.03 + 0.1
    assert pi.value == pytest.approx(0.2 * math.exp(0.5 + 0.13))
    pi.update(8.0, 64)  # on target: only the integral remains
    assert pi.value == pytest.approx(0.2 * math.exp(0.13))
    pi.update(-0.3, 64)  # a negative k1 batch mean is far below target, not an error
    assert pi.value == pytest.approx(0.2 * math.exp(-0.1 + 0.11))
    pi.update(8.0 * math.exp(-0.1), 64)  # e = -0.1, inside the clip; integral 0.11 - 0.01
    assert pi.value == pytest.approx(0.2 * math.exp(-0.05 + 0.10))


def test_pi_resumes_where_it_stopped():
    a = PIKLController(0.2, 8.0, 0.5, 0.1)
    for kl in (1.0, 5.0, 12.0, 20.0):
        a.update(kl, 64)
    b = PIKLController(0.2, 8.0, 0.5, 0.1)
    b.load_state_dict(a.state_dict())
    assert (b.value, b.integral) == (a.value, a.integral)
    a.update(9.0, 64)
    b.update(9.0, 64)
    assert b.value == a.value
    # A checkpoint of a fixed/ziegler run holds only the value: the integral continues from it.
    c = PIKLController(0.2, 8.0, 0.5, 0.1)
    c.load_state_dict({"value": 0.4})
    c.update(8.0, 64)
    assert c.value == pytest.approx(0.4)


def _simulate(ctl: FixedKLController, steps: int = 100, lag: float = 0.1, scale: float = 8.0, power: float = 1.0,
              noise: float = 0.1, seed: int = 0) -> list[float]:
    """A toy policy: its KL relaxes toward scale / coef^power (a stronger penalty, a smaller drift) at rate
    `lag` per step, starting from 0.5 nats; each step measures it with lognormal noise (a batch mean)."""
    rng, kl, measured = random.Random(seed), 0.5, []
    for _ in range(steps):
        m = kl * math.exp(rng.gauss(0.0, noise))
        ctl.update(m, 64)
        kl += lag * (scale / ctl.value ** power - kl)
        measured.append(m)
    return measured


@pytest.mark.parametrize("lag,scale,power", [(0.1, 8.0, 1.0), (0.03, 8.0, 1.0), (0.3, 0.4, 1.0),
                                             (0.1, 1.6, 2.0), (0.03, 0.08, 2.0)])
def test_pi_holds_the_target_over_the_second_half(lag, scale, power):
    # At the demo's start (coef 0.2) the toy drifts to scale / 0.2^power: 40, 2, 40 or 2 nats, target 8.
    for seed in range(3):
        kl = _simulate(PIKLController(0.2, 8.0, 0.5, 0.1), lag=lag, scale=scale, power=power, seed=seed)
        assert all(4.0 <= k <= 12.0 for k in kl[50:]), (seed, [round(k, 1) for k in kl[50:]])


def test_pi_does_not_wind_up_while_the_policy_is_slow_to_move():
    # A policy whose KL can grow by at most 0.4 nats a step (its learning rate), drifting to 40 nats at
    # coef 0.2: the KL is below target for the first ~20 steps whatever the coefficient. A symmetric clip
    # lets the integral sink meanwhile and the KL overshoots in the second half; ours holds it.
    for seed in range(3):
        rng, kl, measured = random.Random(seed), 0.0, []
        pi = PIKLController(0.2, 8.0, 0.5, 0.1)
        for _ in range(100):
            m = kl * math.exp(rng.gauss(0.0, 0.1))
            pi.update(m, 64)
            kl = max(0.0, kl + min(0.4, 0.1 * (8.0 / pi.value - kl)))
            measured.append(m)
        half = measured[50:]
        assert sum(4.0 <= k <= 12.0 for k in half) >= 0.8 * len(half), [round(k, 1) for k in half]
        assert 6.0 <= sum(half) / len(half) <= 10.0


def test_ziegler_cannot_follow_in_100_steps():
    # The demo's old setting: horizon 2000, 64 completions a step. The coefficient can at most grow by
    # (1 + 0.2 * 64 / 2000)^100 = e^0.64, so a policy drifting to 40 nats at coef 0.2 ends near 21.
    zg = AdaptiveKLController(0.2, 8.0, 2000)
    kl = _simulate(zg)
    assert zg.value <= 0.2 * (1 + 0.2 * 64 / 2000) ** 100 == pytest.approx(0.2 * math.exp(0.638), rel=1e-3)
    assert sum(kl[50:]) / 50 > 12.0  # 50% over target


def test_controller_choice():
    parse = lambda *a: C.parse_config(C.PPOConfig, ["--model.name_or_path", "m", *a])
    assert type(make_kl_controller(parse().kl)) is FixedKLController
    assert type(make_kl_controller(parse("--kl.target", "8").kl)) is PIKLController
    zg = make_kl_controller(parse("--kl.target", "8", "--kl.controller", "ziegler", "--kl.horizon", "2000").kl)
    assert type(zg) is AdaptiveKLController and zg.horizon == 2000


@pytest.mark.parametrize("argv, msg", [
    (["--kl.target", "8", "--kl.horizon", "2000"], "kl.horizon is the ziegler controller's"),
    (["--kl.target", "8", "--kl.controller", "ziegler", "--kl.ki", "0.2"], "kl.kp / kl.ki are the pi controller's"),
    (["--kl.target", "8", "--kl.ki", "0"], "kl.ki must be > 0"),
    (["--kl.kp", "-1"], "kl.kp=-1.0 must be >= 0"),
    (["--kl.controller", "pid"], "expected one of pi, ziegler"),
])
def test_kl_checks_at_parse_time(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(C.PPOConfig, ["--model.name_or_path", "m", *argv])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
