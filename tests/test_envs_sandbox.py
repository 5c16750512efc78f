"""The sandbox that runs model-written code: every attack of the issue, against the whole sandbox and, where
the kernel allows namespaces, against the namespace + rlimit layers without the audit hook (so each layer
is shown to hold on its own)."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from rlhfkit.envs.sandbox import Limits, namespaces_available, run_python

LAYERS = [pytest.param({"audit": True}, id="all-layers"),
          pytest.param({"audit": True, "isolate": False}, id="no-namespaces"),
          pytest.param({"audit": False, "isolate": True}, id="namespaces-only",
                       marks=pytest.mark.skipif(not namespaces_available(), reason="no unprivileged namespaces"))]


def test_runs_code_and_reports_its_exit():
    r = run_python("import sys\nprint('hi')\nsys.exit(3)")
    assert (r.returncode, r.stdout, r.timed_out) == (3, "hi\n", False)
    assert run_python("print(sum(range(10)))").ok


@pytest.mark.parametrize("layers", LAYERS)
def test_cannot_write_outside_its_directory(tmp_path, layers):
    target = tmp_path / "pwned.txt"
    code = (f"import os\nopen('mine.txt', 'w').write('ok')\nprint(os.path.exists('mine.txt'))\n"
            f"open({str(target)!r}, 'w').write('x')")
    r = run_python(code, **layers)
    assert r.stdout == "True\n" and r.returncode != 0  # its own directory is writable; the rest is not
    assert not target.exists()
    assert "PermissionError" in r.stderr or "Read-only file system" in r.stderr


@pytest.mark.parametrize("layers", LAYERS)
def test_cannot_open_a_socket(layers):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port, got = srv.getsockname()[1], []
    srv.settimeout(1.5)
    th = threading.Thread(target=lambda: got.append(_accept(srv)), daemon=True)
    th.start()
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                   "s.sendall(b'leak')\nprint('connected')", **layers)
    th.join(3)
    srv.close()
    assert r.returncode != 0 and "connected" not in r.stdout and got in ([], [None])


def _accept(srv):
    try:
        return srv.accept()[0].recv(10)
    except OSError:
        return None


def _sandboxed_processes() -> int:
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                n += b"harness.py" in f.read()
        except OSError:
            pass
    return n


@pytest.mark.parametrize("layers", LAYERS)
def test_fork_bomb_is_stopped(layers):
    if not layers["audit"] and os.geteuid() == 0:
        # RLIMIT_NPROC does not bind root: without the audit hook a fork bomb would grow for the whole
        # wall-time limit (hundreds of processes on the machine running the tests) before the PID
        # namespace's end takes it down. As root, the audit hook is the layer that refuses it.
        pytest.skip("as root only the audit hook stops a fork bomb before the wall-time limit")
    before = _sandboxed_processes()
    t = time.time()
    r = run_python("import os, time\nwhile True:\n    os.fork()\n    time.sleep(0.01)", Limits(wall_s=3), **layers)
    assert r.returncode != 0 and time.time() - t < 8
    if layers["audit"] or os.geteuid() != 0:  # refused at the first fork (RLIMIT_NPROC does not bind root)
        assert not r.timed_out
        assert "PermissionError" in r.stderr or "BlockingIOError" in r.stderr or "Resource temporarily" in r.stderr
    time.sleep(0.5)
    assert _sandboxed_processes() <= before  # whatever it started is gone with it


def test_infinite_loop_is_killed():
    t = time.time()
    r = run_python("while True: pass", Limits(wall_s=30, cpu_s=1))
    assert r.killed_by == "SIGXCPU" and time.time() - t < 10  # CPU limit
    r = run_python("import time\nwhile True: time.sleep(1)", Limits(wall_s=1.5, cpu_s=5))
    assert r.timed_out and r.killed_by == "SIGKILL" and not r.ok  # wall-clock limit (sleeping uses no CPU)


def test_gigabytes_of_output_are_capped():
    r = run_python("import sys\nfor _ in range(10**4): sys.stdout.write('x' * 10**6)", Limits(output_bytes=10_000))
    assert r.returncode != 0 and len(r.stdout) == 10_000
    r = run_python("open('big', 'w').write('x' * 10**8)", Limits(output_bytes=10_000))
    assert r.returncode != 0 and "File too large" in r.stderr


def test_memory_is_limited():
    r = run_python("x = bytearray(2 * 1024**3)", Limits(memory_mb=256))
    assert r.returncode != 0 and "MemoryError" in r.stderr


def test_sees_none_of_the_parents_environment_variables(monkeypatch):
    monkeypatch.setenv("RLHFKIT_SECRET_TOKEN", "s3cret")
    r = run_python("import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ').read())")
    assert r.ok and "s3cret" not in r.stdout and "RLHFKIT_SECRET_TOKEN" not in r.stdout
    assert os.environ["HOME"] not in r.stdout.split("\n")[0] or os.environ["HOME"].startswith("/tmp")


def test_its_directory_is_removed_afterwards():
    r = run_python("import os\nprint(os.getcwd())")
    assert r.ok and not os.path.exists(r.stdout.strip())
