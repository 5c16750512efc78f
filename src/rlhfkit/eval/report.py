"""`rlhfkit report RUN_DIR`: one self-contained HTML page per run, with plots.

It reads what the stages wrote (metrics.jsonl, summary.json, eval.json, samples) under RUN_DIR and its
sub-directories (a demo or loop run holds one directory per stage and round), and writes RUN_DIR/report.html
with the plots embedded (so the page can be mailed or attached as one file) and also saved as PNG files in
RUN_DIR/report_files/.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from rlhfkit.utils.logging import read_jsonl

# Plot panels, in page order: (title, metric-name prefixes or names, y label).
PANELS = [
    ("Reward", ("rollout/reward", "reward/", "rollout/score"), "reward"),
    ("Environment success rate", ("env/success_rate",), "share of episodes"),
    ("Gold vs proxy reward", ("eval/gold", "eval/proxy", "gold/", "proxy/"), "reward"),
    ("KL to the reference", ("kl/", "rollout/kl", "objective/kl", "ppo/kl"), "nats"),
    ("Policy optimisation", ("ppo/", "rloo/", "grpo/", "policy/"), ""),
    ("Response length", ("rollout/response_len", "rollout/length", "length/"), "tokens"),
    ("Loss", ("loss/",), "loss"),
    ("Perplexity", ("ppl/",), "perplexity"),
    ("Reward model", ("rm/", "eval/pearson", "eval/accuracy", "eval/pairwise"), ""),
    ("Throughput", ("perf/tokens_per_s",), "tokens/s"),
    ("Model FLOPs utilisation", ("perf/mfu",), "MFU"),
]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_panels(rows: list[dict], title_prefix: str) -> list[tuple[str, bytes]]:
    """One PNG per panel that has data: every matching metric as a line over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k not in ("step", "time_s")})
    used: set[str] = set()
    out = []
    for title, prefixes, ylabel in PANELS:
        mine = [k for k in keys if k not in used and any(k.startswith(p) or k == p for p in prefixes)]
        mine = [k for k in mine if len(_series(rows, k)[0]) >= 1]
        if not mine:
            continue
        used.update(mine)
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        for k in mine[:8]:
            xs, ys = _series(rows, k)
            ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, ms=3, lw=1.6, label=k)
        ax.set_title(f"{title_prefix}: {title}", fontsize=11)
        ax.set_xlabel("step")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        out.append((title, _png(fig)))
    return out


def plot_before_after(ev: dict) -> bytes | None:
    """Bar chart with 95% intervals of each before/after metric in an eval.json."""
    pairs = [(k[:-len("_before")], ev[k], ev.get(k[:-len("_before")] + "_after")) for k in ev
             if k.endswith("_before") and isinstance(ev[k], dict) and isinstance(ev.get(k[:-7] + "_after"), dict)]
    if not pairs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(2.6 * len(pairs), 3.4), squeeze=False)
    for ax, (name, b, a) in zip(axes[0], pairs):
        vals = [b["mean"], a["mean"]]
        err = [[b["mean"] - b["low"], a["mean"] - a["low"]], [b["high"] - b["mean"], a["high"] - a["mean"]]]
        ax.bar(["before", "after"], vals, yerr=err, capsize=6, color=["#9aa5b1", "#2f7ed8"])
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("before vs after RL (95% intervals over held-out prompts)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def plot_hist(values: list[float], title: str, bins: int = 17) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=bins, color="#2f7ed8", alpha=0.85)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    return _png(fig)


def kl_hold(rows: list[dict], target: float) -> dict[str, float]:
    """How well a run held its KL target over the second half of its logged steps: the mean KL, and the
    share of steps within +-50% of the target."""
    xs, ys = _series(rows, "kl/mean")
    half = [y for x, y in zip(xs, ys) if x > max(xs) / 2] if xs else []
    if not half:
        return {}
    return {"target": target, "second_half_mean": sum(half) / len(half),
            "second_half_within_50pct": sum(0.5 * target <= y <= 1.5 * target for y in half) / len(half)}


def plot_kl_target(rows: list[dict], target: float) -> bytes | None:
    """The measured KL per step against the target, its +-50% band, the second half shaded."""
    xs, ys = _series(rows, "kl/mean")
    if not xs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = kl_hold(rows, target)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.axvspan(max(xs) / 2, max(xs), color="#edf2f7", label="second half")
    ax.axhspan(0.5 * target, 1.5 * target, color="#c6f6d5", alpha=0.6, label="target +-50%")
    ax.axhline(target, color="#276749", lw=1.2, ls="--", label=f"target {target:g}")
    ax.plot(xs, ys, color="#2f7ed8", lw=1.6, label="kl/mean")
    _, coef = _series(rows, "kl/coef")
    if coef:
        ax2 = ax.twinx()
        ax2.plot(_series(rows, "kl/coef")[0], coef, color="#dd6b20", lw=1.0, alpha=0.8, label="kl/coef")
        ax2.set_yscale("log")
        ax2.set_ylabel("KL coefficient (log)", color="#dd6b20")
    ax.set_title(f"KL vs target: second half mean {h['second_half_mean']:.2f}, "
                 f"{100 * h['second_half_within_50pct']:.0f}% of steps within +-50%", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per completion")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def plot_overopt(points: list[dict]) -> bytes | None:
    """Gao et al. 2022's over-optimisation plot: proxy and gold reward of RL checkpoints against their KL to
    the reference, and against sqrt(KL); 95% intervals on both axes."""
    points = [p for p in points if all(isinstance(p.get(k), dict) for k in ("kl", "proxy", "gold"))]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, root in zip(axes, (False, True)):
        f = (lambda v: math.sqrt(max(v, 0.0))) if root else (lambda v: v)
        x = [f(p["kl"]["mean"]) for p in points]
        xerr = [[xi - f(p["kl"]["low"]) for xi, p in zip(x, points)],
                [f(p["kl"]["high"]) - xi for xi, p in zip(x, points)]]
        for name, color in (("proxy", "#2f7ed8"), ("gold", "#dd6b20")):
            y = [p[name]["mean"] for p in points]
            yerr = [[p[name]["mean"] - p[name]["low"] for p in points],
                    [p[name]["high"] - p[name]["mean"] for p in points]]
            # Points, not a line: KL is not monotone in the step (the controller pulls it back).
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=3, lw=1.2, ls="none", color=color,
                        label=f"{name} reward")
        for xi, p in zip(x, points):
            ax.annotate(str(p["step"]), (xi, p["proxy"]["mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("sqrt(KL to the reference)" if root else "KL to the reference (nats per completion)")
        ax.set_ylabel("reward (mean over held-out prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Over-optimisation (Gao et al. 2022): proxy vs gold reward of checkpoints (step numbers on the "
                 "proxy points; 95% intervals)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 32px} header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b8c0cc;font-size:13px} main{padding:16px 32px 48px;max-width:1280px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 20px;margin:16px 0}
h2{font-size:17px;margin:4px 0 10px} h3{font-size:14px;margin:14px 0 6px;color:#4a5568}
.grid{display:flex;flex-wrap:wrap;gap:12px} .grid img{max-width:100%;width:560px;border:1px solid #e2e8f0;border-radius:4px}
.grid img.wide{width:100%} td.up{color:#276749} td.down{color:#9b2c2c}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{border:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f4f8} td.num{text-align:right;font-variant-numeric:tabular-nums} .samples td{max-width:520px}
.kpi{display:inline-block;margin:4px 18px 4px 0} .kpi b{display:block;font-size:20px} .kpi span{font-size:12px;color:#718096}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and {"mean", "low", "high"} <= set(v):
        return f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    if isinstance(v, (list, dict)):
        return html.escape(json.dumps(v)[:200])
    return html.escape(str(v))


def _table(d: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td class='num'>{_fmt(v)}</td></tr>"
                   for k, v in d.items() if not isinstance(v, list) or len(v) < 8)
    return f"<table>{rows}</table>"


def _before_after_table(ev: dict) -> str:
    """metric | before | after | change rows for every *_before/*_after pair, then the other fields."""
    names = [k[:-len("_after")] for k in ev if k.endswith("_after")]
    rows = []
    for n in names:
        b, a, c = ev.get(f"{n}_before"), ev[f"{n}_after"], ev.get(f"{n}_change")
        cls = ""
        if isinstance(c, dict):
            cls = "up" if c["low"] > 0 else "down" if c["high"] < 0 else ""
        rows.append(f"<tr><th>{html.escape(n.replace('_', ' '))}</th><td class='num'>{_fmt(b) if b is not None else ''}"
                    f"</td><td class='num'>{_fmt(a)}</td><td class='num {cls}'>{_fmt(c) if c is not None else ''}"
                    "</td></tr>")
    used = {f"{n}_{s}" for n in names for s in ("before", "after", "change")} | {"samples"}
    table = ("<table><tr><th>metric</th><th>before</th><th>after</th><th>change (paired, 95%)</th></tr>"
             + "".join(rows) + "</table>") if rows else ""
    return table + _table({k: v for k, v in ev.items() if k not in used})


def build_report(run_dir: str | Path, out: str | Path | None = None, title: str = "") -> Path:
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    files = run_dir / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    images = 0

    def img(name: str, data: bytes, cls: str = "") -> str:
        nonlocal images
        images += 1
        fname = f"{images:02d}-{''.join(c if c.isalnum() else '_' for c in name)[:60]}.png"
        (files / fname).write_bytes(data)
        return (f"<img class='{cls}' alt='{html.escape(name)}' "
                f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>")

    top = run_dir / "summary.json"
    if top.exists():
        summ = json.loads(top.read_text())
        kpis = "".join(f"<div class='kpi'><b>{_fmt(v)}</b><span>{html.escape(k)}</span></div>"
                       for k, v in summ.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        rest = {k: v for k, v in summ.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
        parts.append(f"<section><h2>Summary</h2>{kpis}{_table(rest)}</section>")

    for ev_path in sorted(run_dir.rglob("eval.json")):
        ev = json.loads(ev_path.read_text())
        rel = str(ev_path.parent.relative_to(run_dir))
        rel = run_dir.resolve().name if rel == "." else rel
        body = ""
        chart = plot_before_after(ev)
        if chart:
            body += f"<div class='grid'>{img(f'eval {rel}', chart, 'wide')}</div>"
        body += _before_after_table(ev)
        samples = ev.get("samples") or []
        if samples:
            cols = [c for c in ("prompt", "before", "after", "proxy_before", "proxy_after", "gold_before",
                                "gold_after", "judge_before", "judge_after") if c in samples[0]]
            head = "".join(f"<th>{c}</th>" for c in cols)
            rows = "".join("<tr>" + "".join(f"<td>{_fmt(s.get(c, ''))}</td>" for c in cols) + "</tr>"
                           for s in samples[:20])
            body += f"<h3>Samples (same prompts, before and after)</h3><table class='samples'><tr>{head}</tr>{rows}</table>"
        parts.append(f"<section><h2>Evaluation: {html.escape(rel)}</h2>{body}</section>")

    ratings = sorted(run_dir.rglob("ratings.jsonl"))
    for rp in ratings[:4]:
        vals = [r["rating"] for r in read_jsonl(rp) if isinstance(r.get("rating"), (int, float))]
        if vals:
            parts.append(f"<section><h2>Ratings: {html.escape(str(rp.relative_to(run_dir)))}</h2><div class='grid'>"
                         f"{img('ratings ' + str(rp), plot_hist(vals, f'{len(vals)} ratings'))}</div></section>")

    for mpath in sorted(run_dir.rglob("metrics.jsonl")):
        rows = read_jsonl(mpath)
        if not rows:
            continue
        rel = str(mpath.parent.relative_to(run_dir))
        rel = run_dir.resolve().name if rel == "." else rel
        pngs = plot_panels(rows, rel)
        target = _kl_target(mpath.parent / "config.yaml")
        if target and (png := plot_kl_target(rows, target)):
            pngs.insert(0, ("KL vs target", png))
        curve = mpath.parent / "overopt.jsonl"
        if curve.exists() and (png := plot_overopt(read_jsonl(curve))):
            pngs.insert(0, ("over-optimisation", png))
        body = "<div class='grid'>" + "".join(img(f"{rel} {t}", p, "wide" if t == "over-optimisation" else "")
                                              for t, p in pngs) + "</div>"
        if curve.exists():
            body += _overopt_table(read_jsonl(curve))
        s_path = mpath.parent / "summary.json"
        if s_path.exists() and s_path != top:
            body += _table(json.loads(s_path.read_text()))
        parts.append(f"<section><h2>{html.escape(rel)}</h2>{body}</section>")

    if not parts:
        parts.append("<section><p>Nothing to report yet: no metrics.jsonl, summary.json or eval.json here."
                     "</p></section>")
    name = title or run_dir.resolve().name
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>rlhfkit report: "
            f"{html.escape(name)}</title><style>{CSS}</style></head><body><header><h1>rlhfkit report: "
            f"{html.escape(name)}</h1><p>{html.escape(str(run_dir))}</p></header><main>{''.join(parts)}"
            "</main></body></html>")
    out.write_text(page, encoding="utf-8")
    return out


def _overopt_table(points: list[dict]) -> str:
    """The over-optimisation curve's points as a table, with the fluency measures next to the rewards."""
    cols = ["step", "kl", "proxy", "gold", "ref_ppl", "length", "distinct_2"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = "".join("<tr>" + "".join(f"<td class='num'>{_fmt(p.get(c, ''))}</td>" for c in cols) + "</tr>"
                   for p in points)
    return (f"<h3>Over-optimisation curve (held-out prompts; ref_ppl = perplexity of the completions under the "
            f"reference)</h3><table><tr>{head}</tr>{rows}</table>")


def _kl_target(config_yaml: Path) -> float:
    """The run's kl.target from its config.yaml (0 when none)."""
    if not config_yaml.exists():
        return 0.0
    import yaml

    kl = (yaml.safe_load(config_yaml.read_text()) or {}).get("kl") or {}
    return float(kl.get("target") or 0.0) if isinstance(kl, dict) else 0.0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory (any stage, or a demo/loop run with sub-directories)")
    p.add_argument("--out", default="", help="where to write the HTML (default RUN_DIR/report.html)")
    p.add_argument("--title", default="", help="page title (default: the run directory's name)")
    a = p.parse_args(argv)
    if not Path(a.run_dir).is_dir():
        from rlhfkit.errors import DataError

        raise DataError(f"{a.run_dir}: no such run directory")
    print(build_report(a.run_dir, a.out or None, a.title))
    return 0
