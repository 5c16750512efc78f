"""Schemathesis against both servers, as a client that reads only their OpenAPI specs would see them:
every check (no server error, responses and status codes as the spec says, bodies of the documented
shape, schema-valid requests accepted and invalid ones refused, ...), a bounded number of examples per
operation and a fixed seed, so a run is quick and repeatable. The settings it widens, and why, are in
tests/schemathesis/*.toml."""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import torch

from rlhfkit.config import ModelConfig, ServeConfig
from rlhfkit.feedback.app import Settings
from rlhfkit.feedback.app import create_app as feedback_app
from rlhfkit.feedback.store import Store
from rlhfkit.models.factory import build_model
from rlhfkit.serve.server import create_app as serve_app
from rlhfkit.utils.checkpoint import save_model
from tests.test_serve import ThreadServer

HERE = Path(__file__).parent / "schemathesis"
EXAMPLES = 50   # per operation and phase, as in the issue; both servers take about a minute on 2 cores


def schemathesis(url: str, config: str, headers: dict[str, str]) -> str:
    """Run `schemathesis run` in this process; fail with its report unless every check passed."""
    from click.testing import CliRunner
    from schemathesis.cli import schemathesis as cli

    args = ["--no-color", "--config-file", str(HERE / config), "run", url + "/openapi.json", "--checks", "all",
            "--max-examples", str(EXAMPLES), "--seed", "24", "--workers", "1"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    out = result.output
    assert result.exit_code == 0, out[-20_000:]
    summary = re.search(r"\d+ generated, \d+ passed.*", out)
    assert summary, out[-5000:]
    print(url, summary.group(0))    # in the CI log (pytest -s / -rP)
    return out


def test_feedback_api_passes_every_schemathesis_check(tmp_path):
    st = Store(str(tmp_path / "fb.db"))
    st.import_samples([{"prompt": f"prompt {i}", "completion": f"answer {i}.{j}"} for i in range(4) for j in range(4)],
                      kinds=("rate", "rank", "pair", "edit"))
    st.add_annotator("root", "root-password", admin=True)
    srv = ThreadServer(feedback_app(st, Settings(max_body_kb=64)))
    try:
        out = schemathesis(srv.url, "feedback.toml", {"Authorization": f"Bearer {st.new_token('root')}"})
    finally:
        srv.stop()
        st.close()
    assert "Tested: 9" in out


def test_model_server_api_passes_every_schemathesis_check(tmp_path, tiny_tokenizer, monkeypatch):
    torch.manual_seed(0)
    save_model(tmp_path / "model", build_model(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=128),
                                               tiny_tokenizer), tiny_tokenizer)
    cfg = ServeConfig(model=str(tmp_path / "model"), name="tiny", feedback_db=str(tmp_path / "fb.db"),
                      max_new_tokens=4, max_tokens_limit=8, max_prompts=2, max_n=2, max_request_tokens=96,
                      max_body_kb=64)
    srv = ThreadServer(serve_app(cfg))
    try:
        c = httpx.Client(base_url=srv.url)
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
        # Given as the spec's security schemes, so that schemathesis knows when it leaves them out.
        monkeypatch.setenv("RK_FUZZ_CHAT_SESSION", c.cookies["rk_chat"])
        monkeypatch.setenv("RK_FUZZ_CSRF", csrf)
        out = schemathesis(srv.url, "serve.toml", {})
    finally:
        srv.stop()
    assert "Tested: 5" in out
