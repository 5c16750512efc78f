"""TRL's side of `rlhfkit bench peers`: one trainer run, in TRL's virtualenv, in a fresh process.

    python trl_worker.py WORKLOAD_JSON OUT_JSON

Run by run.py with this source tree on PYTHONPATH, so that it reads the same workload module as our side;
nothing of rlhfkit beyond that module is imported here.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(workload_json: str, out_json: str) -> int:
    from rlhfkit.bench.peers.workload import REWARD_SECONDS, Workload, read_prompts, reward_fn

    w = Workload.load(workload_json)
    import torch

    if w.threads:
        torch.set_num_threads(w.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    Cfg, Trainer = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[w.trainer]
    tok = AutoTokenizer.from_pretrained(w.model)
    # The same user turns as ours; TRL applies the chat template to conversational prompts as we do.
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in read_prompts(w.prompts_file)]})
    policy = AutoModelForCausalLM.from_pretrained(w.model, dtype=torch.float32)

    gen_s: list[float] = []
    orig_generate = policy.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = orig_generate(*a, **kw)
        gen_s.append(time.perf_counter() - t)
        return out

    policy.generate = timed_generate  # the trainer generates with this object (LoRA: through its wrapper)

    marks: list[dict] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append({"t": time.perf_counter(), "peak": peak_rss_mb(), "gen": sum(gen_s),
                          "reward": REWARD_SECONDS[0], "score": score_s[0], "logs": None})

        def on_log(self, args, state, control, logs=None, **kw):
            if marks and logs and "completions/mean_length" in logs:  # the step's log, not the final summary
                marks[-1]["logs"] = {k: v for k, v in logs.items() if isinstance(v, (int, float))}

    peft_config = None
    if w.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    cfg = Cfg(output_dir=str(Path(out_json).with_suffix("")) + "_run", max_steps=w.warmup_steps + w.steps,
              learning_rate=w.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
              adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=w.grad_clip,
              per_device_train_batch_size=w.samples_per_step,  # counts completions: one optimizer step per rollout
              gradient_accumulation_steps=1, steps_per_generation=1, num_generations=w.completions_per_prompt,
              max_completion_length=w.max_new_tokens, temperature=w.temperature, top_p=1.0, beta=w.kl_coef,
              logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
              gradient_checkpointing=False, seed=w.seed, data_seed=w.seed, disable_tqdm=True,
              dataloader_num_workers=0, use_vllm=False)
    trainer = Trainer(model=policy, reward_funcs=reward_fn(w.reward), args=cfg, train_dataset=ds,
                      processing_class=tok, callbacks=[Marks()], peft_config=peft_config)
    # The no-gradient forwards of a step (the reference's and, where TRL computes them, the old policy's
    # log-probs) are timed apart from the update.
    score_s = [0.0]
    logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(*a, **kw):
        if torch.is_grad_enabled():
            return logps(*a, **kw)
        t = time.perf_counter()
        out = logps(*a, **kw)
        score_s[0] += time.perf_counter() - t
        return out

    trainer._get_per_token_logps_and_entropies = timed_logps
    t0 = time.perf_counter()
    trainer.train()
    res = {"side": "trl", "train_call_s": time.perf_counter() - t0, "marks": marks, "start": t0,
           "versions": {"trl": trl.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version()},
           "torch_threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb(),
           "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
           "ref_model": getattr(trainer, "ref_model", None) is not None}
    Path(out_json).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1], sys.argv[2]))
