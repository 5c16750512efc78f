"""`rlhfkit bench peers`: our trainers beside TRL's on a real model (SmolLM2-135M-Instruct by default).

workload.py  the one workload definition both sides read (settings, prompts, the reward functions)
trl_worker.py  TRL's side, run by the interpreter of its own virtualenv (requirements-trl.txt)
run.py       the command: builds the workload and the virtualenv, runs fresh interleaved processes,
             writes JSON lines and prints the table
"""
