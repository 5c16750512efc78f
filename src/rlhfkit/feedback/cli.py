"""`rlhfkit feedback <command>`: serve the annotation app, import samples, assign, run simulated
labelers, export, measure agreement, manage annotator accounts and the database schema.

Every command takes --db (a SQLite file path or a SQLAlchemy URL; default runs/feedback/feedback.db).
A fresh SQLite file gets the schema automatically; other databases: `rlhfkit feedback db upgrade`.
"""
from __future__ import annotations

import argparse
import getpass
import json
import sys

from rlhfkit.errors import ConfigError

DEFAULT_DB = "runs/feedback/feedback.db"
EPILOG = "`rlhfkit feedback <command> --help` explains each command's flags."


def _store(a: argparse.Namespace, upgrade: str = "auto"):
    from rlhfkit.feedback.store import Store

    return Store(a.db, upgrade=upgrade)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _scale(s: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 1,5), got {s!r}") from None
    return lo, hi


def serve(argv: list[str]) -> int:
    import socket

    import uvicorn

    from rlhfkit.config import FeedbackServeConfig, parse_config
    from rlhfkit.feedback.app import Settings, create_app
    from rlhfkit.feedback.store import Store

    cfg = parse_config(FeedbackServeConfig, argv, prog="rlhfkit feedback serve")
    store = Store(cfg.db, max_text_chars=cfg.max_text_chars)
    app = create_app(store, Settings(session_hours=cfg.session_hours, secure_cookies=cfg.secure_cookies,
                                     max_body_kb=cfg.max_body_kb, project=cfg.project,
                                     login_max_failures=cfg.login_max_failures,
                                     login_window_minutes=cfg.login_window_minutes,
                                     trusted_proxies=list(cfg.trusted_proxies)))
    # Bind the socket ourselves so that port 0 works and the real address is printed before serving.
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror})") from None
    port = sock.getsockname()[1]
    n_users = len(store.annotators())
    print(f"rlhfkit feedback: serving {store.engine.url.render_as_string(hide_password=True)} on "
          f"http://{cfg.host}:{port}  (API spec: /openapi.json)", flush=True)
    if not n_users:
        print("no annotator accounts yet: create one with `rlhfkit feedback users add NAME --admin`",
              flush=True)
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from any loopback client; the
    # app reads it itself, from trusted_proxies only.
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, access_log=cfg.log_level in
                                           ("info", "debug"), timeout_graceful_shutdown=5, proxy_headers=False))
    server.run(sockets=[sock])
    store.close()
    return 0


def generate_samples(policy: str, prompts: list[str], k: int, *, max_new_tokens: int = 48,
                     temperature: float = 1.0, seed: int = 0, template: str = "plain",
                     batch_size: int = 8) -> list[dict]:
    """Sample k completions per prompt from a causal LM checkpoint: [{prompt, completion, model}]."""
    import torch

    from rlhfkit.config import TokenizerConfig
    from rlhfkit.models.factory import get_tokenizer, load_causal_lm

    torch.manual_seed(seed)
    tok = get_tokenizer(TokenizerConfig(), policy)
    model = load_causal_lm(policy).eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        texts = chunk if template == "plain" else [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                    add_generation_prompt=True)
            for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=template == "plain")
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=temperature,
                                 max_new_tokens=max_new_tokens, num_return_sequences=k,
                                 pad_token_id=tok.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]                    # (B * k, new tokens)
        for j, ids in enumerate(new):
            out.append({"prompt": chunk[j // k], "completion": tok.decode(ids, skip_special_tokens=True),
                        "model": policy})
    return out


def _import(a: argparse.Namespace) -> int:
    from rlhfkit.data.sources import load_texts, read_jsonl_records

    sources = [x for x in (a.samples, a.policy, a.texts) if x]
    if len(sources) != 1:
        raise ConfigError("give exactly one of --samples FILE.jsonl, --policy DIR (with --prompts), "
                          "--texts SPEC")
    if a.samples:
        samples = read_jsonl_records(a.samples, ("completion",))
        for i, r in enumerate(samples):
            if not isinstance(r.get("prompt", ""), str):
                raise ConfigError(f"{a.samples}: record {i + 1}: 'prompt' must be a string")
    elif a.policy:
        if not a.prompts:
            raise ConfigError("--policy needs --prompts (a .txt file, one prompt per line, or .jsonl "
                              "with 'prompt')")
        prompts = load_texts(a.prompts, text_field="prompt", max_docs=a.limit)
        samples = generate_samples(a.policy, prompts, a.k, max_new_tokens=a.max_new_tokens,
                                   temperature=a.temperature, seed=a.seed, template=a.template)
    else:
        samples = [{"prompt": "", "completion": t} for t in load_texts(a.texts, max_docs=a.limit)]
    if a.limit and a.samples:
        samples = samples[:a.limit]
    store = _store(a)
    counts = store.import_samples(samples, project=a.project, round=a.round, kinds=_csv(a.kinds),
                                  overlap=a.overlap, group_size=a.group_size, scale=a.scale)
    print(json.dumps({"project": a.project, **counts}))
    return 0


def _users(a: argparse.Namespace) -> int:
    store = _store(a)
    if a.users_cmd == "list":
        for u in store.annotators():
            flags = [f for f in ("admin", "has_password", "has_token") if u[f]]
            flags += [] if u["active"] else ["disabled"]
            print(f"{u['name']:<24} {u['kind']:<8} {' '.join(flags)}")
        return 0
    if a.users_cmd in ("enable", "disable"):
        store.set_active(a.name, a.users_cmd == "enable")
        return 0
    if a.users_cmd == "token":
        print(store.new_token(a.name))
        return 0
    password = _read_password(a) if a.users_cmd == "passwd" or not a.no_password else None
    if a.users_cmd == "passwd":
        store.set_password(a.name, password)
        return 0
    store.add_annotator(a.name, password, admin=a.admin)
    print(f"created {'admin' if a.admin else 'annotator'} {a.name}")
    if a.token:
        print(store.new_token(a.name))
    return 0


def _read_password(a: argparse.Namespace) -> str:
    if a.password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
    elif sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            raise ConfigError("the passwords differ")
    else:
        raise ConfigError("no terminal to ask for a password: pipe it with --password-stdin, or use "
                          "--no-password (token-only account)")
    return pw


def _db(a: argparse.Namespace) -> int:
    from rlhfkit.feedback import migrate

    store = _store(a, upgrade="skip")   # connect without the version check: fixing it is why we are here
    if a.db_cmd == "upgrade":
        migrate.upgrade(store, a.revision)
    elif a.db_cmd == "downgrade":
        migrate.downgrade(store, a.revision)
    elif a.db_cmd == "stamp":
        migrate.stamp(store, a.revision)
    print(f"schema at {migrate.current(store) or 'none'} (newest: {migrate.head()})")
    return 0


def _duration(text: str) -> float:
    """'90', '90s', '30m', '2h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90, 90s, 30m, 2h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be > 0")
    return value


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit feedback", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")
    sub.add_parser("serve", add_help=False,
                   help="run the annotation web app + JSON API (flags: rlhfkit feedback serve --help)")

    def with_db(c: argparse.ArgumentParser) -> argparse.ArgumentParser:
        c.add_argument("--db", default=DEFAULT_DB,
                       help="SQLite file or SQLAlchemy URL (default: %(default)s)")
        return c

    def cmd(name: str, help: str, db: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        return with_db(c) if db else c

    c = cmd("import", "add samples to a round as tasks (from a JSONL file, a policy checkpoint, or texts)")
    c.add_argument("--samples", help="JSONL with prompt, completion (optional model, id) per line")
    c.add_argument("--policy", help="causal LM checkpoint to sample completions from (needs --prompts)")
    c.add_argument("--prompts", help="prompts for --policy: .txt (one per line) or .jsonl with 'prompt'")
    c.add_argument("--texts", help="a text source (e.g. vader:movie, a .txt file) imported as completions "
                                   "with an empty prompt")
    c.add_argument("--project", default="default", help="project name (default: %(default)s)")
    c.add_argument("--round", type=int, default=None, help="round number; default: a new round")
    c.add_argument("--kinds", default="rate", help="task kinds to make, comma-separated from rate,rank,pair,"
                                                   "edit (default: %(default)s)")
    c.add_argument("--overlap", type=int, default=1, help="annotators per task (default: %(default)s)")
    c.add_argument("--group-size", type=int, default=4,
                   help="samples per ranking task (default: %(default)s)")
    c.add_argument("--scale", type=_scale, default=None, help="Likert scale MIN,MAX of a new project "
                                                              "(default 1,5)")
    c.add_argument("--limit", type=int, default=0, help="import at most this many records/prompts; 0 = all")
    c.add_argument("--k", type=int, default=4, help="--policy: completions per prompt (default: %(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=48, help="--policy: tokens per completion")
    c.add_argument("--temperature", type=float, default=1.0, help="--policy: sampling temperature")
    c.add_argument("--template", choices=("plain", "chat"), default="plain",
                   help="--policy: prompt as is, or through the tokenizer's chat template")
    c.add_argument("--seed", type=int, default=0, help="--policy: sampling seed")

    c = cmd("assign", "set a round's overlap and pre-assign its tasks to named annotators")
    c.add_argument("--project", default="default", help="project name")
    c.add_argument("--round", type=int, default=None, help="round number (default: the newest)")
    c.add_argument("--overlap", type=int, required=True, help="annotators per task")
    c.add_argument("--annotators", default="", help="comma-separated names; empty = only change the overlap "
                                                    "(annotators then claim tasks as they come)")

    c = cmd("release", "give back tasks that annotators claimed but left untouched, so others can take them")
    c.add_argument("--project", default="default", help="project name")
    c.add_argument("--round", type=int, default=None, help="round number (default: the newest)")
    c.add_argument("--older-than", type=_duration, required=True, metavar="DURATION",
                   help="release pending tasks untouched for this long: seconds, or with a unit (90s, 30m, 2h)")

    c = cmd("label", "let a simulated labeler answer a round's rate / rank / pair tasks")
    c.add_argument("--labeler", required=True, choices=("vader-rater", "reward-model", "bradley-terry"),
                   help="vader-rater: noisy simulated person from VADER's per-rater word scores; "
                        "reward-model: answers from a reward's scores; bradley-terry: the same with BT noise")
    c.add_argument("--reward", default="rule:rlhfkit.feedback.labelers:vader_compound",
                   help="reward spec for reward-model / bradley-terry (rule:..., or a reward model dir)")
    c.add_argument("--temperature", type=float, default=1.0, help="bradley-terry noise temperature")
    c.add_argument("--seed", type=int, default=0, help="labeler seed (a different simulated person)")
    c.add_argument("--count", type=int, default=1, help="run this many labelers with seeds seed, seed+1, ...")
    c.add_argument("--name", default="", help="annotator name (default: <labeler>-<seed>)")
    c.add_argument("--project", default="default", help="project name")
    c.add_argument("--round", type=int, default=None, help="round number (default: every open round)")
    c.add_argument("--limit", type=int, default=0, help="stop after this many answers per labeler; 0 = all")

    c = cmd("export", "write ratings / pairs / rankings / edits (docs/formats.md) as JSONL or HF datasets")
    c.add_argument("--project", default="default", help="project name")
    c.add_argument("--round", type=int, default=None, help="only this round (default: all)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--kinds", default="ratings,pairs,rankings,edits", help="what to export")
    c.add_argument("--format", choices=("jsonl", "hf"), default="jsonl", help="JSONL files or HF datasets")
    c.add_argument("--no-clean", action="store_true",
                   help="keep records as stored (no whitespace normalising, no dropping of empty or "
                        "duplicate records)")

    c = cmd("agreement", "inter-annotator agreement of a project, or of the real VADER human ratings")
    c.add_argument("--project", default="default", help="project name")
    c.add_argument("--round", type=int, default=None, help="only this round")
    c.add_argument("--vader", nargs="?", const="movie,amazon,nyt,tweets", default=None, metavar="DOMAINS",
                   help="instead: Krippendorff's alpha of the real per-rater VADER ratings")

    c = cmd("users", "annotator accounts: add, list, passwd, token, enable, disable", db=False)
    us = c.add_subparsers(dest="users_cmd", required=True)
    for name, help in (("add", "create an account"), ("passwd", "set a new password"),
                       ("token", "print a new API token (replaces the old one)"),
                       ("enable", "allow logins again"), ("disable", "refuse logins and tokens"),
                       ("list", "list accounts")):
        u = with_db(us.add_parser(name, help=help))
        if name != "list":
            u.add_argument("name")
        if name in ("add", "passwd"):
            u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if name == "add":
            u.add_argument("--admin", action="store_true", help="may see the admin view and export")
            u.add_argument("--token", action="store_true", help="also print an API token")
            u.add_argument("--no-password", action="store_true", help="token-only account (no web login)")

    c = cmd("db", "database schema: upgrade, downgrade, current, stamp", db=False)
    ds = c.add_subparsers(dest="db_cmd", required=True)
    for name, default in (("upgrade", "head"), ("downgrade", None), ("stamp", "head")):
        d = with_db(ds.add_parser(name, help=f"{name} the schema"))
        d.add_argument("revision", nargs="?" if default else None, default=default,
                       help="target revision" + (f" (default: {default})" if default else " (e.g. base)"))
    with_db(ds.add_parser("current", help="print the schema revision"))

    if argv and argv[0] == "serve":
        return serve(argv[1:])
    a = p.parse_args(argv)
    if a.cmd == "import":
        return _import(a)
    if a.cmd == "assign":
        n = _store(a).assign(a.project, a.round, _csv(a.annotators), a.overlap)
        print(f"overlap {a.overlap}; {n} new assignments")
    elif a.cmd == "release":
        n = _store(a).release_stale(a.project, a.round, a.older_than)
        print(f"released {n} stale assignment(s)")
    elif a.cmd == "label":
        from rlhfkit.feedback.labelers import make_labeler, run_labeler

        store = _store(a)
        for seed in range(a.seed, a.seed + a.count):
            lab = make_labeler(a.labeler, reward=a.reward, temperature=a.temperature, seed=seed)
            name = a.name if a.name and a.count == 1 else (f"{a.name}-{seed}" if a.name else None)
            n = run_labeler(store, lab, project=a.project, round=a.round, name=name, limit=a.limit,
                            progress=True)
            print(f"{name or f'{lab.name}-{seed}'}: {n} answers")
    elif a.cmd == "export":
        from rlhfkit.feedback.export import export

        summary = export(_store(a), a.project, a.out, a.round, kinds=_csv(a.kinds), fmt=a.format,
                         do_clean=not a.no_clean)
        for k, v in summary.items():
            dropped = ", ".join(f"{n} {why}" for why, n in v["dropped"].items() if n) or "none"
            print(f"{k:<9} {v['records']:>7} records -> {v['path']}  (dropped: {dropped})")
    elif a.cmd == "agreement":
        from rlhfkit.feedback import agreement

        if a.vader:
            print(f"{'data':<18} {'units':>7} {'ratings':>8} {'alpha interval':>15} {'alpha ordinal':>14}")
            for r in agreement.vader_alpha(_csv(a.vader)):
                print(f"{r['data']:<18} {r['units']:>7} {r['ratings']:>8} {r['alpha_interval']:>15.3f} "
                      f"{r['alpha_ordinal']:>14.3f}")
        else:
            print(json.dumps(agreement.store_agreement(_store(a), a.project, a.round), indent=1))
    elif a.cmd == "users":
        return _users(a)
    elif a.cmd == "db":
        return _db(a)
    return 0
