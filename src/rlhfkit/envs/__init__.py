"""Text environments for RL: gymnasium's reset / step conventions, single- and multi-turn.

    from rlhfkit import envs
    env = envs.make("reasoning", task="chain_sum")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("Answer: 12")

Built in (docs/envs.md): `reasoning` (reasoning-gym tasks with their verifiers), `humaneval` (code run in
a sandbox against unit tests), `guess_number` (multi-turn: the environment answers every turn). Your own:
`envs.register("name", "my_pkg.mod:MyEnv")`, or name "my_pkg.mod:MyEnv" directly. The RL stages take
one with `--env.name NAME --env.kwargs '{...}'` (GRPO, RLOO, REINFORCE, PPO), `rlhfkit eval` measures its
success rate and pass@k on held-out episodes.
"""
from rlhfkit.envs.base import Env, EnvError, Observation, SingleTurnEnv
from rlhfkit.envs.registry import REGISTRY, EnvSpec, check_kwargs, make, register, spec

__all__ = ["REGISTRY", "Env", "EnvError", "EnvSpec", "Observation", "SingleTurnEnv", "check_kwargs", "make",
           "register", "spec"]

register("reasoning", "rlhfkit.envs.reasoning:ReasoningEnv",
         "a reasoning-gym task (task=chain_sum, basic_arithmetic, leg_counting, ...), answer checked by its verifier")
register("humaneval", "rlhfkit.envs.code:HumanEvalEnv",
         "HumanEval: complete a Python function; reward = fraction of its tests passed in the sandbox")
register("guess_number", "rlhfkit.envs.guess:GuessNumberEnv",
         "multi-turn: guess a hidden number, told higher / lower after each wrong guess")
