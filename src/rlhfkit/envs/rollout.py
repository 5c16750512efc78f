"""Batched episodes: many environments at once, one policy turn per environment per round.

    eps = run_episodes(model, tok, envs, seeds, SamplingParams(max_new_tokens=16, stop=["\\n"]))
    eps.ro              # a Rollout: prompt = the first observation, completion = every later token
    eps.ro.completion_mask   # 1 on the policy's tokens only: environment / tool / user tokens get no gradient
    eps.returns, eps.success, eps.turns, eps.errors

Each round samples one turn for every live episode in one batch (per-turn token budget max_new_tokens; EOS
and stop strings end a turn), steps each environment with the turn's text, and appends the environment's
answer to that episode's tokens. One KV cache holds every episode's transcript for the whole episode: a
turn starts by feeding only what is new (the previous turn's last token and the environment's answer),
never the transcript again. Rows that have finished their turn or their episode are fed padding that the
attention mask hides. This runs HF's forward (any causal LM); our fast decoder serves single-turn rollouts.

The Rollout a trainer sees is token-in, token-out: the sampled ids are kept as sampled (never
re-tokenized), the environment's text is tokenized once and appended, `logprobs` are the sampling-time
log-probs on policy tokens and 0 elsewhere, and `step_rewards` (B, C) holds each step's reward on the last
token of the policy turn that earned it (PPO's GAE uses them; GRPO/RLOO/REINFORCE use the return, their
sum).

The accelerated path's replay record covers single-turn rollouts only, so a multi-turn Rollout has
record=None and its training forward is the plain one.

Bad environments: a step that raises, returns something malformed (see base.check_step) or takes longer
than `step_timeout_s` either ends its episode with return 0 and the error recorded in `errors`
(on_error="skip"), or stops with EnvError naming the episode, turn and action (on_error="stop"). A reset
that fails always stops: without a first observation there is no episode to score.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.envs.base import Env, EnvError, Message, SingleTurnEnv, check_observation, check_step
from rlhfkit.rl.rollout import Rollout, SamplingParams, _cut_at_stop, eos_ids, left_pad, sample_next


@dataclass
class Episodes:
    ro: Rollout
    returns: torch.Tensor        # (B,) sum of each episode's step rewards (0 for an episode that errored)
    success: torch.Tensor        # (B,) bool: info["success"] of the last step
    turns: torch.Tensor          # (B,) policy turns taken
    errors: list[str | None]     # (B,) what went wrong in the episode, if anything

    def metrics(self) -> dict[str, float]:
        return {"env/success_rate": float(self.success.float().mean()),
                "env/turns_mean": float(self.turns.float().mean()),
                "env/errors": float(sum(e is not None for e in self.errors))}


def call_with_timeout(fn: Callable, arg: Any, timeout: float) -> Any:
    """fn(arg) in a daemon thread; TimeoutError if it has not returned after `timeout` seconds (the
    thread is abandoned: Python cannot kill it, but it no longer holds the run up)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = fn(arg)
        except BaseException as e:  # noqa: BLE001 - reported with the episode
            box["err"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "err" in box:
        raise box["err"]
    return box["out"]


class Renderer:
    """Turns observations into token ids: the first one as the prompt, later ones as the environment's
    answer after a policy turn. template "chat": the tokenizer's chat template (the assistant turn's closing
    tokens, then the new messages, then the assistant header); "plain": each message's text on its own
    line."""

    def __init__(self, tok: Any, template: str, model: Any = None) -> None:
        self.tok, self.template = tok, template
        self.eos = set(eos_ids(tok, model))
        if template == "chat":
            if not getattr(tok, "chat_template", None):
                from rlhfkit.errors import ConfigError

                raise ConfigError("data.template=chat but the tokenizer has no chat template; use plain")
            self._base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "\x00"}]
            text = tok.apply_chat_template(self._base, tokenize=False)
            self.closing = text[text.rindex("\x00") + 1:]  # e.g. "<|im_end|>\n"
            self._base_text = text

    def prompt(self, messages: list[Message]) -> list[int]:
        if self.template == "chat":
            x = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(x["input_ids"] if hasattr(x, "keys") else x)
        return list(self.tok("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"])

    def reply(self, turn_ids: Sequence[int], messages: list[Message]) -> list[int]:
        """Token ids of the environment's answer after a policy turn that sampled `turn_ids`."""
        if self.template == "chat":
            closing = self.closing
            if turn_ids and turn_ids[-1] in self.eos:  # the policy closed its turn itself
                end = self.tok.decode([turn_ids[-1]], skip_special_tokens=False)
                closing = closing[len(end):] if closing.startswith(end) else ""
            full = self.tok.apply_chat_template(self._base + messages, tokenize=False, add_generation_prompt=True)
            text = closing + full[len(self._base_text):]
        else:
            text = "".join("\n" + m["content"] for m in messages) + "\n"
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


class TurnCache:
    """HF's forward over a batch of episodes with one DynamicCache kept across turns. `mask` (B, L) is 1 on
    the cached positions that are real tokens of each episode; padding fed for finished rows stays 0."""

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache()
        self.mask: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (B,) the next position id of each row

    def feed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append ids (B, l) (mask (B, l): 1 on real tokens, left-padded so every row with any token has
        one in the last column); returns the logits after each row's last column (B, V)."""
        if self.mask is None:
            self.mask, self.pos = mask.new_zeros(mask.size(0), 0), mask.new_zeros(mask.size(0))
        pos = self.pos[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, mask], 1)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=self.mask, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.pos = self.pos + mask.sum(-1)
        return out.logits[:, -1]


def _sample_turn(tc: TurnCache, logits: torch.Tensor, live: torch.Tensor, params: SamplingParams, tok: Any,
                 stops: torch.Tensor, pad: int, u: torch.Tensor | None) -> tuple[list[list[int]], list[list[float]]]:
    """One policy turn for the rows in `live` (B,): each row's sampled ids and log-probs. Every sampled
    token but the turn's last is fed to the cache; the last one is fed with the environment's answer."""
    B = logits.size(0)
    toks: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    alive = live.clone()
    for t in range(params.max_new_tokens):
        nxt, lp = sample_next(logits, params.temperature, params.top_k, params.top_p,
                              None if u is None else u[:, t:t + 1].to(logits.device))
        for i in alive.nonzero()[:, 0].tolist():
            toks[i].append(int(nxt[i]))
            lps[i].append(float(lp[i]))
            if params.stop and _cut_at_stop(tok.decode(toks[i][-17:], skip_special_tokens=True), params.stop)[1]:
                alive[i] = False
        alive &= ~torch.isin(nxt, stops)
        if not bool(alive.any()) or t == params.max_new_tokens - 1:
            break
        logits = tc.feed(torch.where(alive, nxt, torch.full_like(nxt, pad))[:, None], alive.long()[:, None])
    return toks, lps


def _left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = torch.as_tensor(r)
            mask[i, L - len(r):] = 1
    return ids.to(device), mask.to(device)


def _max_positions(model: Any) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 1 << 30)


def run_episodes(model: torch.nn.Module, tok: Any, envs: Sequence[Env], seeds: Sequence[int],
                 params: SamplingParams, template: str = "plain", uniforms: torch.Tensor | None = None,
                 max_turns: int = 0, on_error: str = "skip", step_timeout_s: float = 10.0, group_size: int = 1,
                 name: str = "env") -> Episodes:
    """Run len(envs) episodes, episode i on envs[i] from reset(seeds[i]), all turns batched.

    `uniforms` (B, max_turns * max_new_tokens): each episode's sampling randomness, turn t using columns
    t*max_new .. (t+1)*max_new - 1, so an episode samples the same tokens in any batch. `max_turns`: 0 =
    each environment's own. Episodes that outgrow the model's context are truncated."""
    B, T = len(envs), max_turns or max(e.max_turns for e in envs)
    render = Renderer(tok, template, model)
    limit = _max_positions(model)
    prompt_ids, prompt_texts, history = [], [], []
    for i, (env, s) in enumerate(zip(envs, seeds)):
        try:
            obs, _ = call_with_timeout(lambda seed, env=env: env.reset(seed=seed), s, step_timeout_s)
            msgs = check_observation(obs, f"{name}.reset(seed={s})")
        except Exception as e:
            raise EnvError(f"environment {name}: reset(seed={s}) failed: {type(e).__name__}: {e}") from e
        if not msgs:
            raise EnvError(f"environment {name}: reset(seed={s}) returned an empty observation")
        history.append(msgs)
        prompt_texts.append("\n".join(m["content"] for m in msgs))
        prompt_ids.append(render.prompt(msgs))

    comp: list[list[int]] = [[] for _ in range(B)]
    mask: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    rew_at: list[list[tuple[int, float]]] = [[] for _ in range(B)]
    texts: list[list[str]] = [[] for _ in range(B)]
    returns, success, finished = torch.zeros(B), torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    turns = torch.zeros(B, dtype=torch.long)
    errors: list[str | None] = [None] * B
    done = [False] * B
    n_new = params.max_new_tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    stops = torch.tensor(sorted(render.eos), device=device)
    was_training = model.training
    model.eval()
    tc = TurnCache(model)
    pending = [list(p) for p in prompt_ids]  # what each row's cache still lacks
    try:
        for t in range(T):
            for i in range(B):  # no room for another full turn: truncated
                if not done[i] and len(prompt_ids[i]) + len(comp[i]) + n_new > limit:
                    done[i] = True
            live = [i for i in range(B) if not done[i]]
            if not live:
                break
            with torch.inference_mode():
                logits = tc.feed(*_left_padded([pending[i] if not done[i] else [] for i in range(B)], pad, device))
                u = None if uniforms is None else uniforms[:, t * n_new:(t + 1) * n_new]
                live_mask = torch.tensor([not d for d in done], device=device)
                turn_toks, turn_lps = _sample_turn(tc, logits, live_mask, params, tok, stops, pad, u)
            pending = [[] for _ in range(B)]
            for i in live:
                ids = turn_toks[i]
                text = tok.decode(ids, skip_special_tokens=True)
                text = _cut_at_stop(text, params.stop)[0] if params.stop else text
                comp[i] += ids
                mask[i] += [1] * len(ids)
                lps[i] += turn_lps[i]
                texts[i].append(text)
                turns[i] += 1
                where = f"environment {name}, episode seed {seeds[i]}, turn {t + 1}"
                try:
                    out = call_with_timeout(envs[i].step, text, step_timeout_s)
                    obs, r, term, trunc, info = check_step(out, where)
                except Exception as e:  # the environment, not the policy, failed: report it with the episode
                    msg = f"{where}: {type(e).__name__}: {e} (action: {text[:200]!r})"
                    if on_error == "stop":
                        raise EnvError(msg + "; set env.on_error=skip to score such episodes 0 and go on") from e
                    errors[i], returns[i], done[i] = msg, 0.0, True
                    continue
                returns[i] += r
                rew_at[i].append((max(len(comp[i]) - 1, 0), r))
                if term or trunc or t == T - 1:
                    done[i], finished[i] = True, term
                    success[i] = bool(info.get("success", False))
                    continue
                history[i] = history[i] + [{"role": "assistant", "content": text}] + obs
                env_ids = render.reply(ids, obs)
                comp[i] += env_ids
                mask[i] += [0] * len(env_ids)
                lps[i] += [0.0] * len(env_ids)
                pending[i] = ids[-1:] + env_ids
    finally:
        model.train(was_training)

    p_ids, p_mask = left_pad(prompt_ids, pad)
    C = max(1, max(len(c) for c in comp))
    c_ids = torch.full((B, C), pad, dtype=torch.long)
    c_mask, c_lp, step_r = torch.zeros((B, C), dtype=torch.long), torch.zeros(B, C), torch.zeros(B, C)
    for i in range(B):
        n = len(comp[i])
        c_ids[i, :n] = torch.as_tensor(comp[i], dtype=torch.long)
        c_mask[i, :n] = torch.as_tensor(mask[i], dtype=torch.long)
        c_lp[i, :n] = torch.as_tensor(lps[i])
        for pos, r in rew_at[i]:
            step_r[i, pos] += r
        if errors[i] is not None:
            step_r[i] = 0.0
    ro = Rollout(p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device), c_lp.to(device),
                 finished.to(device), prompt_texts, [" | ".join(x) for x in texts], group_size,
                 step_rewards=step_r.to(device))
    return Episodes(ro, returns.to(device), success, turns, errors)


class EnvRunner:
    """The driver's sampler of episodes: for a single-turn environment (a prompt set with a reward, a
    verifier) one batched generate through the run's Sampler (its replay record kept) and one batched
    score; for a multi-turn one, run_episodes on a pool of environments made once."""

    def __init__(self, make_env: Callable[[], Env], tok: Any, template: str, max_turns: int = 0,
                 on_error: str = "skip", step_timeout_s: float = 10.0, name: str = "env") -> None:
        self.make_env, self.tok, self.template, self.name = make_env, tok, template, name
        self.max_turns, self.on_error, self.step_timeout_s = max_turns, on_error, step_timeout_s
        self.env = make_env()
        self.single = isinstance(self.env, SingleTurnEnv) and max_turns <= 1
        self.pool: list[Env] = [self.env]
        self.renderer = Renderer(tok, template) if self.single else None

    @property
    def turns_per_episode(self) -> int:
        return 1 if self.single else (self.max_turns or self.env.max_turns)

    def __call__(self, sampler: Any, seeds: Sequence[int], n: int, params: SamplingParams,
                 uniforms: torch.Tensor | None = None) -> Episodes:
        """Episodes for seeds x n samples (rows g*n .. g*n+n-1 share seed g)."""
        if self.single:
            return self._single(sampler, seeds, n, params, uniforms)
        B = len(seeds) * n
        while len(self.pool) < B:
            self.pool.append(self.make_env())
        return run_episodes(sampler.model, self.tok, self.pool[:B], [s for s in seeds for _ in range(n)], params,
                            self.template, uniforms, self.max_turns, self.on_error,
                            self.step_timeout_s, n, self.name)

    def _single(self, sampler, seeds, n, params, uniforms) -> Episodes:
        env = self.env
        texts, infos, ids = [], [], []
        for s in seeds:
            text, info = env.prompt(s)
            texts.append(text)
            infos.append(info)
            ids.append(info["prompt_ids"] if "prompt_ids" in info else
                       self.renderer.prompt([{"role": "user", "content": text}]))
        ro = sampler(ids, params, n, texts, uniforms)
        rewards = env.score(ro.prompts, ro.completions, [x for x in infos for _ in range(n)])
        returns = torch.as_tensor(rewards, dtype=torch.float32) if not isinstance(rewards, torch.Tensor) else rewards
        if returns.shape != (len(ro.prompts),):
            raise EnvError(f"environment {self.name}: score() returned shape {tuple(returns.shape)} for "
                           f"{len(ro.prompts)} completions")
        ok = torch.tensor([env.success(float(r)) for r in returns.tolist()])
        return Episodes(ro, returns.float(), ok, torch.ones(len(ro.prompts), dtype=torch.long),
                        [None] * len(ro.prompts))
