"""Text environments: the API and registry, batched multi-turn episodes (a batch equals its episodes run
one at a time; environment tokens get no gradient), bad environments, the env config section, and a
tiny policy that learns the guessing game with GRPO."""
from __future__ import annotations

import pytest
import torch

from rlhfkit import envs
from rlhfkit.config import GRPOConfig, PPOConfig, check_config, parse_config
from rlhfkit.envs.rollout import run_episodes
from rlhfkit.errors import ConfigError
from rlhfkit.rl.rollout import SamplingParams, completion_logprobs
from tests.env_utils import Broken, word_tokenizer


def test_guess_number_follows_gymnasium_conventions():
    env = envs.make("guess_number", low=1, high=8, max_turns=3)
    obs, info = env.reset(seed=5)
    secret = info["secret"]
    assert obs == "Guess my number from 1 to 8." and 1 <= secret <= 8
    assert env.reset(seed=5)[1]["secret"] == secret  # the seed fixes the episode
    low = 1 if secret > 1 else 2
    obs, r, term, trunc, info = env.step(f"I say {low}")
    assert (obs, r, term) == (("higher" if low < secret else "lower"), 0.0, False)
    assert env.step("no idea")[0] == "a number, please"
    obs, r, term, trunc, info = env.step(str(secret))
    assert (r, term, trunc, info["success"]) == (1.0, True, False, True)
    env.reset(seed=5)
    outs = [env.step(str(secret % 8 + 1)) for _ in range(3)]
    assert [o[3] for o in outs] == [False, False, True]  # truncated after max_turns
    test = envs.make("guess_number", split="test")
    assert [test.reset(seed=s)[1]["secret"] for s in range(20)] != [env.reset(seed=s)[1]["secret"] for s in range(20)]


def test_registry_names_errors_and_your_own_class():
    with pytest.raises(ConfigError, match="unknown environment 'nope'.*guess_number"):
        envs.make("nope")
    with pytest.raises(ConfigError, match="takes no argument.*colour.*it takes: low, high"):
        envs.check_kwargs("guess_number", {"colour": 1})
    env = envs.make("tests.env_utils:Broken", how="raise")
    assert isinstance(env, Broken) and env.how == "raise"


@pytest.fixture(scope="module")
def policy():
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.factory import build_model

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=96), tok)
    return model, tok


def _episodes(model, tok, seeds, uniforms, template="plain", **kw):
    es = [envs.make("guess_number", low=1, high=4, max_turns=3) for _ in seeds]
    return run_episodes(model, tok, es, seeds, SamplingParams(max_new_tokens=3, temperature=1.0), template,
                        uniforms=uniforms, **kw)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_batch_of_episodes_equals_episodes_one_at_a_time(policy, tiny_tokenizer, tiny_model_cfg, template):
    from rlhfkit.models.factory import build_model

    if template == "chat":  # the BPE tokenizer with a chat template, on a model of its vocabulary
        tok = tiny_tokenizer
        torch.manual_seed(0)
        model = build_model(tiny_model_cfg.__class__(n_layer=2, n_head=4, d_model=64, max_seq_len=128), tok)
    else:
        model, tok = policy
    seeds = list(range(16))
    u = torch.rand(len(seeds), 3 * 3, generator=torch.Generator().manual_seed(1))
    batch = _episodes(model, tok, seeds, u, template)
    ro = batch.ro
    assert int(batch.turns.max()) >= 2 and bool((ro.completion_mask == 0).any())  # real multi-turn episodes
    assert template == "chat" or int(batch.turns.min()) < 3  # some end early: later turns run a subset
    for i, s in enumerate(seeds):
        one = _episodes(model, tok, [s], u[i:i + 1], template).ro
        n = one.completion_ids.size(1)
        assert ro.completion_ids[i, :n].tolist() == one.completion_ids[0].tolist()
        assert ro.completion_mask[i, :n].tolist() == one.completion_mask[0].tolist()
        assert int(ro.completion_mask[i, n:].sum()) == 0
        torch.testing.assert_close(ro.logprobs[i, :n], one.logprobs[0], atol=1e-5, rtol=0)
        assert ro.prompt_ids[i][ro.prompt_mask[i].bool()].tolist() == one.prompt_ids[0].tolist()
        assert float(batch.returns[i]) == float(_episodes(model, tok, [s], u[i:i + 1], template).returns[0])
    # The sampling-time log-probs are the policy's: a training forward over the transcript gives them back.
    lp, _ = completion_logprobs(model.eval(), ro)
    torch.testing.assert_close(lp, ro.logprobs, atol=2e-5, rtol=0)


def test_each_episode_starts_from_its_own_seed(policy):
    model, tok = policy
    es = [envs.make("guess_number", low=1, high=4) for _ in range(12)]
    run_episodes(model, tok, es, list(range(12)), SamplingParams(max_new_tokens=1))
    fresh = envs.make("guess_number", low=1, high=4)
    assert [e.secret for e in es] == [fresh.reset(seed=s)[1]["secret"] for s in range(12)]
    assert len({e.secret for e in es}) > 1


def test_environment_tokens_get_no_gradient(policy):
    from rlhfkit.rl.losses import aggregate, clipped_surrogate

    model, tok = policy
    eps = _episodes(model, tok, list(range(8)), torch.rand(8, 9, generator=torch.Generator().manual_seed(2)))
    ro, mask = eps.ro, eps.ro.completion_mask
    env_tok = (mask == 0) & (torch.arange(mask.size(1)) < (mask.size(1) - mask.flip(1).argmax(1, keepdim=True)))
    assert bool(env_tok.any())  # environment tokens between policy turns
    # They are the environment's text, with log-prob 0 recorded, and they do not count as sampled.
    text = tok.decode(ro.completion_ids[0][ro.completion_mask[0] == 0][:1].tolist())
    assert text in ("higher", "lower", "a")
    assert float(ro.logprobs[env_tok].abs().sum()) == 0.0
    model.train()
    lp, _ = completion_logprobs(model, ro)
    lp.retain_grad()
    adv = torch.randn(len(ro.prompts))[:, None]
    per_token, _, _ = clipped_surrogate(lp, lp.detach(), adv, 0.2, 0.2)
    aggregate(per_token, mask.float(), "token", normalizer=float(mask.sum())).backward()
    assert float(lp.grad[env_tok].abs().max()) == 0.0
    assert float(lp.grad[mask.bool()].abs().min()) > 0.0  # every policy token gets a gradient
    model.zero_grad()


@pytest.mark.parametrize("how,match", [("raise", "KeyError: 'boom'"),
                                       ("malformed", "must return \\(observation, reward"),
                                       ("nan", "reward is nan"), ("hang", "TimeoutError: no answer within 0.5 s")])
def test_bad_environment_is_reported_with_its_episode(policy, how, match):
    model, tok = policy
    sp = SamplingParams(max_new_tokens=2)
    es = [Broken(how, at=2), Broken("raise", at=99)]
    eps = run_episodes(model, tok, es, [0, 1], sp, on_error="skip", step_timeout_s=0.5, name="broken")
    assert eps.errors[1] is None and float(eps.returns[1]) == 1.5  # the good episode: 3 turns x 0.5
    assert eps.errors[0] is not None and pytest.importorskip("re").search(match, eps.errors[0])
    assert "episode seed 0, turn 2" in eps.errors[0] and float(eps.returns[0]) == 0.0
    assert float(eps.ro.step_rewards[0].abs().sum()) == 0.0 and int(eps.turns[0]) == 2
    with pytest.raises(envs.EnvError, match="broken, episode seed 0, turn 2.*env.on_error=skip"):
        run_episodes(model, tok, [Broken(how, at=2)], [0], sp, on_error="stop", step_timeout_s=0.5,
                     name="broken")


def test_step_rewards_sit_on_each_turns_last_policy_token(policy):
    model, tok = policy
    eps = run_episodes(model, tok, [Broken("raise", at=99)], [0], SamplingParams(max_new_tokens=2))
    m, r = eps.ro.completion_mask[0], eps.ro.step_rewards[0]
    ends = [t for t in range(len(m)) if m[t] == 1 and (t + 1 == len(m) or m[t + 1] == 0)]
    assert len(ends) == 3 and r[ends].tolist() == [0.5] * 3 and float(r.sum()) == 1.5


def test_env_config_section(tmp_path):
    cfg = parse_config(GRPOConfig, ["--model.name_or_path", "x", "--env.name", "guess_number",
                                    "--env.kwargs", "{high: 4, max_turns: 2}", "--env.on_error", "stop"])
    assert cfg.env.kwargs == {"high": 4, "max_turns": 2} and cfg.env.on_error == "stop"

    def bad(**over):
        cfg = GRPOConfig()
        cfg.model.name_or_path = "x"
        for k, v in over.items():
            a, b = k.split("__")
            setattr(getattr(cfg, a), b, v)
        with pytest.raises(ConfigError) as e:
            check_config(cfg)
        return str(e.value)

    assert "brings its own prompts: remove data.source" in bad(env__name="guess_number", data__source="p.txt")
    assert "brings its own reward: remove reward.spec" in bad(env__name="guess_number", reward__spec="rule:length")
    assert "not vllm" in bad(env__name="guess_number", rollout__backend="vllm")
    assert "unknown environment 'guess'" in bad(env__name="guess")
    assert "takes no argument(s) hgh" in bad(env__name="guess_number", env__kwargs={"hgh": 3})
    assert "env.kwargs / env.max_turns need env.name" in bad(env__kwargs={"high": 3})
    assert "single-turn environment" in bad(env__name="humaneval", env__max_turns=3)
    ppo = PPOConfig()
    ppo.model.name_or_path, ppo.env.name = "x", "guess_number"
    check_config(ppo)  # every RL stage takes an environment


def test_gae_runs_over_policy_tokens_only():
    from rlhfkit.rl.advantages import gae, last_token_index

    # One episode: policy token, environment token, policy token; reward 1 at the end; gamma = lam = 1.
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.25, 9.0, 0.5, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    # A_2 = 1 - 0.5; A_0 = (0 + V_2 - V_0) + A_2 = 0.25 + 0.5: the environment token is skipped, not an end.
    assert adv.tolist() == [[0.75, 0.0, 0.5, 0.0]] and ret.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    # A right-padded mask (single turn) is unchanged: lambda < 1, hand-computed.
    adv, _ = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 7.0]]), torch.tensor([[1.0, 1.0, 0.0]]),
                 1.0, 0.5)
    assert adv.tolist() == [[0.25, 0.5, 0.0]]  # A_1 = 1 - 0.5; A_0 = (0 + 0.5 - 0.5) + 0.5 * 0.5
    assert last_token_index(torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])).tolist() == [2, 1, 0]
