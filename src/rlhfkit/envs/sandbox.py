"""Run untrusted (model-written) Python in a separate, locked-down process.

    res = run_python("print(1 + 1)", Limits(wall_s=5))
    res.ok, res.stdout, res.stderr, res.timed_out, res.killed_by, res.isolation

What holds the code in (each layer on its own stops the attacks in tests/test_envs_sandbox.py that it
is named for):
  * a separate process in its own session (process group), killed with the whole group after `wall_s`;
  * resource limits set before it starts: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), the size
    of any file it writes, its stdout / stderr included (RLIMIT_FSIZE: output is capped, the writer is
    killed by SIGXFSZ), no core files, few open files, and no new processes (RLIMIT_NPROC, set by the
    harness just before the untrusted code runs: a fork bomb gets EAGAIN; the kernel does not apply it
    to root, e.g. in a container running as root, where the audit hook and the PID namespace stop it);
  * a fresh temporary directory as cwd, HOME and TMPDIR, deleted afterwards; an environment with nothing
    inherited (no tokens or keys from the parent's environment variables); Python in isolated mode (-I);
  * where the kernel lets an unprivileged user make namespaces (`unshare`, util-linux): a network
    namespace with no interfaces (no network at all, not even loopback to the host's services), a
    mount namespace in which every file system is read-only except the sandbox's own directory, and a
    PID namespace (when the program ends or is killed, every process it started dies with it); then a
    second user namespace, so the code holds no capability to undo that;
  * inside Python, before the untrusted code: an audit hook (PEP 578, cannot be removed from Python) that
    refuses sockets, new processes (fork, exec, spawn, system, subprocess), ctypes / loading native
    libraries, and opening files for writing outside the sandbox directory.

Without unprivileged namespaces (`Result.isolation == "rlimits+audit"`) the network and the file system
are guarded only by the audit hook, which native code could get around; such code cannot be loaded
(ctypes is refused), but treat that setting as weaker, and say so in what you report.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The harness: trusted code that runs first in the sandboxed interpreter, then the untrusted program.
_HARNESS = r'''
import os, resource, sys
_root = os.path.realpath(os.getcwd())
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/proc/self/fd/%d" % path)
    except Exception:
        return False
    return p == _root or p.startswith(_root + os.sep)

_DENY = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
         "os.system", "os.kill", "os.killpg", "ctypes.", "_ctypes.", "os.putenv", "pty.", "resource.setrlimit",
         "sys.addaudithook", "mmap.")
_WRITES = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
           "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move")

def _hook(event, args):
    if event.startswith(_DENY) and event not in ("socket.getaddrinfo", "socket.gethostname"):
        raise PermissionError("sandbox: %s is not allowed" % event)
    if event == "socket.getaddrinfo":
        raise PermissionError("sandbox: no network")
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR))
        if writes and path is not None and not _inside(path):
            raise PermissionError("sandbox: writing outside the sandbox directory (%s)" % (path,))
    elif event in _WRITES:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError("sandbox: %s outside the sandbox directory (%s)" % (event, a))

sys.addaudithook(_hook)
del _hook
_src = open("program.py", encoding="utf-8").read()
_g = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_src, "program.py", "exec"), _g)
'''

# Run in the first (root-mapped) namespaces: every mount read-only but the sandbox directory, then a second
# user namespace without capabilities runs Python.
_LOCKDOWN = r'''
d="$1"; shift
mount --bind "$d" "$d" || exit 97
cd "$d" || exit 97  # the bind mount, not the directory under it (which is about to become read-only)
for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$m" in "$d"|/proc|/proc/*|/sys|/sys/*) continue;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null
done
exec unshare --user -- "$@"
'''


@dataclass
class Limits:
    wall_s: float = 10.0          # wall-clock time, then the process group is killed
    cpu_s: int = 5                # CPU seconds (SIGXCPU, then SIGKILL)
    memory_mb: int = 512          # address space
    output_bytes: int = 64_000    # stdout and stderr each, and any file written (RLIMIT_FSIZE)
    open_files: int = 64


@dataclass
class Result:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool               # killed after Limits.wall_s
    killed_by: str | None         # the signal that ended it (SIGKILL, SIGXCPU, SIGXFSZ, ...), if any
    isolation: str                # "namespaces+rlimits+audit" or "rlimits+audit"
    cpu_s: float = 0.0            # CPU seconds it used

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether this kernel lets us make user, network and mount namespaces without privileges."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "true"],
                           capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _limit(lim: Limits):
    import resource

    def apply() -> None:
        mem = lim.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.output_bytes, lim.output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim.open_files, lim.open_files))
    return apply


def _read(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", "replace")


def run_python(code: str, limits: Limits | None = None, isolate: bool | None = None, audit: bool = True) -> Result:
    """Run `code` as a Python program in the sandbox; returns its exit status and (capped) output.
    `isolate`: use namespaces (default: wherever available). `audit` False leaves the audit hook out (only
    for testing the other layers on their own)."""
    lim = limits or Limits()
    ns = namespaces_available() if isolate is None else isolate
    out_dir = Path(tempfile.mkdtemp(prefix="rlhfkit-out-"))
    work = Path(tempfile.mkdtemp(prefix="rlhfkit-sandbox-"))
    try:
        (work / "program.py").write_text(code, encoding="utf-8")
        harness = _HARNESS if audit else _HARNESS.replace("sys.addaudithook(_hook)", "pass")
        (work / "harness.py").write_text(harness, encoding="utf-8")
        env = {"HOME": str(work), "TMPDIR": str(work), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        cmd = [sys.executable, "-I", "-B", "harness.py"]
        if ns:
            cmd = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child", "--",
                   "/bin/sh", "-c", _LOCKDOWN,
                   "lockdown", str(work), *cmd]
        with open(out_dir / "stdout", "wb") as fo, open(out_dir / "stderr", "wb") as fe:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True, preexec_fn=_limit(lim), close_fds=True)  # noqa: PLW1509 - setrlimit only
            timed_out, deadline = False, time.monotonic() + lim.wall_s
            try:  # wait4: the exit status and the CPU time of the program (and what it waited for)
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.monotonic() > deadline:
                        timed_out = True
                        os.killpg(proc.pid, signal.SIGKILL)
                        pid, status, usage = os.wait4(proc.pid, 0)
                        break
                    time.sleep(0.005)
            finally:
                try:  # the whole group: anything it started dies with it
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        killed = signal.Signals(-rc).name if rc < 0 else None
        if ns and rc == 97:
            raise RuntimeError("sandbox: could not set up the mount namespace")
        if not timed_out and cpu >= lim.cpu_s:  # (under namespaces the signal reaches us as unshare's exit 1)
            killed = "SIGXCPU"
        return Result(rc, _read(out_dir / "stdout", lim.output_bytes), _read(out_dir / "stderr", lim.output_bytes),
                      timed_out, "SIGKILL" if timed_out else killed,
                      "namespaces+rlimits+audit" if ns else "rlimits+audit", round(cpu, 3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
