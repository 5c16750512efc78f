"""An environment's success rate and pass@k on held-out episodes, with 95% intervals (`rlhfkit eval
--env.name ...`).

Each of `problems` held-out problems (episode seeds 0..problems-1 of the environment made with
split=test where it has splits) is run `n` times. Per problem: c of n episodes succeed; pass@k is the
unbiased estimate 1 - C(n-c, k) / C(n, k) (Chen et al. 2021); the success rate is c / n. The intervals
are over problems (the unit that was held out): Wilson's for a rate from one episode per problem,
Student's t over the per-problem values otherwise.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch

from rlhfkit.eval import metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (needs k <= n)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _interval(values: np.ndarray, binary: bool) -> dict[str, float]:
    if binary:
        m, lo, hi = metrics.wilson_ci(int(values.sum()), len(values))
    else:
        m, lo, hi = metrics.mean_ci(values.tolist())
    return {"mean": m, "low": lo, "high": hi}


def held_out_kwargs(name: str, kwargs: dict) -> dict:
    """The environment's arguments with split=test, if it takes a split and none was given."""
    from rlhfkit.envs import spec

    params = inspect.signature(spec(name).load()).parameters
    return {**kwargs, "split": "test"} if "split" in params and "split" not in kwargs else dict(kwargs)


@torch.no_grad()
def evaluate_env(model: torch.nn.Module, tok: Any, ecfg: Any, problems: int, n: int, ks: list[int], params: Any,
                 template: str = "plain", backend: str = "auto", seed: int = 0, batch_problems: int = 16) -> dict:
    """Success rate and pass@k of `model` on held-out episodes of the environment of `ecfg` (an EnvConfig)."""
    from rlhfkit import envs
    from rlhfkit.envs.rollout import EnvRunner
    from rlhfkit.rl.common import step_uniforms
    from rlhfkit.rl.rollout import Sampler

    kwargs = held_out_kwargs(ecfg.name, ecfg.kwargs)
    runner = EnvRunner(lambda: envs.make(ecfg.name, **kwargs), tok, template, ecfg.max_turns, ecfg.on_error,
                       ecfg.step_timeout_s, ecfg.name)
    size = len(runner.env) if hasattr(runner.env, "__len__") else problems
    problems = min(problems, size)
    sampler = Sampler(model, tok, backend, "", seed)
    was = model.training
    model.eval()
    ok, ret, errors, samples = [], [], 0, []
    try:
        for start in range(0, problems, batch_problems):
            seeds = list(range(start, min(start + batch_problems, problems)))
            u = step_uniforms(seed, start, len(seeds) * n, runner.turns_per_episode * params.max_new_tokens)
            eps = runner(sampler, seeds, n, params, u)
            ok += eps.success.tolist()
            ret += eps.returns.tolist()
            errors += sum(e is not None for e in eps.errors)
            samples += [{"prompt": p, "episode": c, "return": r}
                        for p, c, r in zip(eps.ro.prompts[::n], eps.ro.completions[::n], eps.returns[::n].tolist())]
    finally:
        model.train(was)
    c = np.asarray(ok, dtype=np.float64).reshape(problems, n).sum(1)  # successes per problem
    out: dict[str, Any] = {"success_rate": _interval(c / n, binary=n == 1),
                           "return": _interval(np.asarray(ret).reshape(problems, n).mean(1), binary=False)}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = _interval(np.array([pass_at_k(n, int(x), k) for x in c]), binary=n == 1)
    return {"metrics": out, "problems": problems, "episodes_per_problem": n, "env_kwargs": kwargs,
            "errors": errors, "samples": samples}
