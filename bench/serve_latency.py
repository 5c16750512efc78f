"""Latency of a small request while a large one runs, against a real `rlhfkit serve` on 127.0.0.1.

A from-scratch model of the demo policy's shape (4 layers, d_model 256, a 2,048-token BPE trained on
3,000 VADER snippets; weights random: the cost of decoding does not depend on them) is served in a
subprocess. We measure:

1. idle: a 4-token request (max_tokens=4), alone, repeated before and after the large request;
2. busy: the same request, repeated while a large request (8 prompts x n=16 x 1,024 tokens) runs on a
   server started with limits that admit it; the ratio busy / idle is what the queue's turns buy;
3. defaults: whether a server with the default limits takes the large request at all.

    PYTHONPATH=src python bench/serve_latency.py [--repeats 10]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

SMALL = {"prompt": "The movie was", "max_tokens": 4, "temperature": 0}
LARGE = {"prompt": [f"Review number {i}: the film" for i in range(8)], "n": 16, "max_tokens": 1024,
         "temperature": 1.0, "stop": []}


def build_model(out: Path) -> None:
    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.data.sources import load_texts
    from rlhfkit.data.tokenizer import train_tokenizer
    from rlhfkit.models.factory import build_model as build
    from rlhfkit.utils.checkpoint import save_model

    tok = train_tokenizer(load_texts("vader")[:3000], vocab_size=2048)
    torch.manual_seed(0)
    save_model(out, build(ModelConfig(n_layer=4, n_head=4, d_model=256, max_seq_len=1280), tok), tok)


def start(model: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "serve", "--model", str(model), "--port", "0",
                             "--feedback_db", "", "--log_level", "warning", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    line = proc.stdout.readline()
    m = re.search(r"http://[\d.]+:\d+", line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stdout.read()}")
    return proc, m.group(0)


def small(url: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=SMALL, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="small requests per measurement")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model)
        proc, url = start(model, "--max_tokens_limit", "1024", "--max_request_tokens", "200000",
                          "--request_timeout_s", "3600")
        try:
            small(url)                                    # warm-up
            idle = [small(url) for _ in range(args.repeats)]
            done: dict[str, float] = {}

            def large() -> None:
                t0 = time.perf_counter()
                r = httpx.post(url + "/v1/completions", json=LARGE, timeout=3600)
                r.raise_for_status()
                done["large_s"] = time.perf_counter() - t0
                done["tokens"] = r.json()["usage"]["completion_tokens"]

            th = threading.Thread(target=large)
            th.start()
            time.sleep(1.0)                               # the large request is generating by now
            busy = [small(url) for _ in range(args.repeats)]
            still_running = th.is_alive()
            th.join()
            idle += [small(url) for _ in range(args.repeats)]
        finally:
            proc.kill()
        proc, url = start(model)
        try:
            r = httpx.post(url + "/v1/completions", json=LARGE, timeout=60)
        finally:
            proc.kill()
    med_idle, med_busy = statistics.median(idle), statistics.median(busy)
    print(f"load average at the end: {os.getloadavg()}")
    print(f"idle 4-token request: median {med_idle * 1000:.0f} ms (max {max(idle) * 1000:.0f})")
    print(f"same, while 8 x 16 x 1,024 runs: median {med_busy * 1000:.0f} ms (max {max(busy) * 1000:.0f}); "
          f"ratio {med_busy / med_idle:.2f}x median, {max(busy) / med_idle:.2f}x worst; large request still "
          f"running after the last small one: {still_running}")
    print(f"large request: {done['large_s']:.1f} s, {done['tokens']} completion tokens")
    print(f"with the default limits: HTTP {r.status_code}: {r.json()['error']['message'] if r.status_code != 200 else 'ok'}")


if __name__ == "__main__":
    main()
