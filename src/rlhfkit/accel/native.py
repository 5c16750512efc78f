"""Our float32 CPU kernels (csrc/kernels.c): built at first use, loaded with ctypes, torch's where not.

The kernels are plain C, compiled at first use with the machine's C compiler (`cc`, or $CC) for this CPU
(-march=native) and cached under the data directory ($RLHFKIT_DATA_DIR/native, keyed by the source, the
flags and the CPU), then loaded with ctypes. Built with -fopenmp and loaded after torch, the library links
torch's own OpenMP runtime, so its loops run on torch's threads (torch.set_num_threads applies) and never
fight them for the cores. Where any of that is missing (no compiler, not Linux, another OpenMP runtime, a
failed build) or RLHFKIT_NATIVE=0, every caller takes torch's ops instead: same results to float
rounding, slower. `native_status()` says which is in use and why.

Users: accel/activations.py (the tanh-GELU), accel/fastdecode.py (a decode step's bias epilogues,
GPT-2's whole decode step in one call, whose matmuls call the BLAS sgemm torch itself calls:
`sgemm_address`, and the training passes' attention: `attention_forward` / `attention_backward`) and
rl/rollout.py (plain sampling in one pass: `sample_rows`). `PackedWeight` is not ours: it calls MKL's
packed sgemm in torch's own library, for the Llama decode step's products; it is on when our kernels are.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
_BASE_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
_X86_FLAGS = ["-mprefer-vector-width=512"]  # AVX-512 machines: gcc would otherwise use 256-bit vectors
_state: dict = {}  # "lib": the loaded library or None, "status": why
_FUNCTIONS = ("rlhfkit_gelu_tanh", "rlhfkit_gelu_tanh_backward", "rlhfkit_gelu_tanh_strided",
              "rlhfkit_gelu_tanh_backward_strided", "rlhfkit_bias_gelu_tanh", "rlhfkit_bias_kv",
              "rlhfkit_bias_residual", "rlhfkit_gpt2_step", "rlhfkit_sample_rows",
              "rlhfkit_mm_rows", "rlhfkit_sum_squares",
              "rlhfkit_token_logprobs", "rlhfkit_logz_backward", "rlhfkit_attention_forward",
              "rlhfkit_attention_backward", "rlhfkit_gelu_tanh_and_backward_strided",
              "rlhfkit_gelu_tanh_backward_colsum")


def _cpu_signature() -> str:
    """What the compiled code depends on (-march=native): the machine and its CPU model and flags."""
    sig = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            sig += sorted({line.strip() for line in f if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        pass
    return "\n".join(sig)


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f
                    if any(k in line for k in ("libgomp", "libiomp", "libomp")) and "/" in line}
    except OSError:
        return set()


def _build(out: Path, cc: str, source: Path, flag_sets: list[list[str]], libs: list[str]) -> str:
    """Compile `source` into `out` with the first of `flag_sets` that works (atomically: concurrent first
    uses race harmlessly); returns '' or the compiler's complaint."""
    err = ""
    for flags in flag_sets:  # the later ones for compilers without the first's
        tmp = ""
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            r = subprocess.run([cc, *flags, str(source), "-o", tmp, *libs], capture_output=True, text=True,
                               timeout=120, check=False)
            if r.returncode == 0:
                os.replace(tmp, out)
                return ""
            lines = (r.stderr or r.stdout).strip().splitlines()
            err = lines[-1] if lines else f"{cc} exited with {r.returncode}"
        except (OSError, subprocess.SubprocessError) as e:  # a read-only cache, a hung compiler
            err = str(e)
        finally:
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
    return err


def built_library(source: Path, compiler_env: str, compiler: str, flag_sets: list[list[str]],
                  key: str, libs: list[str] = ()) -> tuple[Path | None, str]:
    """The shared library built from `source`, cached under the data directory by a hash of the source,
    the flags and `key` (what else the build depends on). Builds it if missing, with $`compiler_env`
    or `compiler`. Returns (path, '') or (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, f"built on Linux only, this is {sys.platform}"
    from rlhfkit.data.sources import data_dir

    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join(flag_sets[0] + list(libs)).encode() + key.encode()).hexdigest()
    path = data_dir() / "native" / f"{source.stem}-{digest[:16]}.so"
    if path.exists():
        return path, ""
    cc = os.environ.get(compiler_env) or compiler
    if shutil.which(cc) is None:
        return None, f"no compiler: {cc!r} not found; set {compiler_env}"
    err = _build(path, cc, source, flag_sets, list(libs))
    return (None, f"compiling {source.name} failed: {err}") if err else (path, "")


def open_library(path: Path, void_functions: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str]:
    """The library at `path` with its `void_functions` declared as returning nothing; (None, why) if it
    does not load."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"loading {path} failed: {e}"
    for name in void_functions:
        getattr(lib, name).restype = None
    return lib, ""


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("RLHFKIT_NATIVE", "1") == "0":
        return None, "off (RLHFKIT_NATIVE=0)"
    if not sys.platform.startswith("linux"):
        return None, f"off (built on Linux only, this is {sys.platform})"
    before = _openmp_runtimes()  # torch's (it is imported): the kernel must share it
    if not before or any("libgomp" not in p for p in before):
        return None, f"off (torch's OpenMP runtime is not GNU's libgomp: {sorted(before) or 'none'})"
    path, why = built_library(_SOURCE, "CC", "cc", [_BASE_FLAGS + _X86_FLAGS, _BASE_FLAGS], _cpu_signature(),
                              ["-lm"])
    if path is None:
        return None, f"off ({why.replace('no compiler', 'no C compiler')})"
    lib, err = open_library(path, _FUNCTIONS)
    if lib is None:
        return None, f"off ({err})"
    if _openmp_runtimes() != before:  # it brought its own OpenMP, whose threads would fight torch's
        return None, f"off (loading it added an OpenMP runtime: {sorted(_openmp_runtimes() - before)})"
    return lib, f"on ({path})"


def lib() -> ctypes.CDLL | None:
    if not _state.get("enabled", True):
        return None
    if "lib" not in _state:
        _state["lib"], _state["status"] = _load()
    return _state["lib"]


def set_enabled(on: bool) -> None:
    """Use our kernels (where they load) or torch's ops, from now on in this process: the run's choice
    (accel.select, from run.accel)."""
    _state["enabled"] = bool(on)


def native_status() -> str:
    """'on (path)' if our kernels are in use, else 'off (why)'."""
    if lib() is None and not _state.get("enabled", True):
        return "off (run.accel=off)"
    return _state["status"]


def native_ok(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and lib() is not None


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def rows_of(t: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """(d0, d1, n, s0, s1) when t is a (d0, d1, n) view (or fewer dims) with contiguous rows of n: what
    the kernels' strided variants read in place; None if t needs a copy first."""
    if t.dim() > 3 or t.dim() == 0 or t.stride(-1) != 1:
        return None
    shape, strides = [1] * (3 - t.dim()) + list(t.shape), [0] * (3 - t.dim()) + list(t.stride())
    return shape[0], shape[1], shape[2], strides[0], strides[1]


def i64(*v: int) -> list[ctypes.c_int64]:
    """The kernels' int64_t arguments."""
    return [ctypes.c_int64(x) for x in v]


# Decode-step epilogues: y is a contiguous (rows, n) product written without its bias b; each adds b in place.
def _epilogue_ok(y: torch.Tensor, b: torch.Tensor, *more: torch.Tensor) -> bool:
    return (native_ok(y, b, *more) and y.dim() == 2 and b.dim() == 1 and b.numel() == y.size(1)
            and all(t.is_contiguous() for t in (y, b, *more)))


def bias_gelu_tanh_(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y += b in place; returns gelu_tanh(y) (new)."""
    if not _epilogue_ok(y, b):
        y.add_(b)
        return torch.nn.functional.gelu(y, approximate="tanh")
    g = torch.empty_like(y)
    lib().rlhfkit_bias_gelu_tanh(ptr(y), ptr(b), ptr(g), *i64(*y.shape))
    return g


def gelu_tanh_backward_colsum(dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(dy * gelu'(x), its sum over the rows) for contiguous (rows, n) dy and x, in one pass of ours (the
    gradients of a linear layer's output before its bias and of the bias); None where our kernels are off
    or this does not apply."""
    if not native_ok(dy, x) or dy.dim() != 2 or dy.shape != x.shape or not (dy.is_contiguous() and x.is_contiguous()):
        return None
    dx, colsum = torch.empty_like(dy), dy.new_empty(dy.size(1))
    lib().rlhfkit_gelu_tanh_backward_colsum(ptr(dy), ptr(x), ptr(dx), *i64(*dy.shape), ptr(colsum))
    return dx, colsum


def bias_kv_(y: torch.Tensor, b: torch.Tensor, off: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """y += b in place, then k = y[:, off:off + m] and v = y[:, off + m:off + 2m] (k, v: (rows, m))."""
    m = k.numel() // max(y.size(0), 1)
    if not _epilogue_ok(y, b, k, v) or k.shape != v.shape or k.numel() != y.size(0) * m or off + 2 * m > y.size(1):
        y.add_(b)
        k.view(y.size(0), -1).copy_(y[:, off:off + m])
        v.view(y.size(0), -1).copy_(y[:, off + m:off + 2 * m])
        return
    lib().rlhfkit_bias_kv(ptr(y), ptr(b), *i64(y.size(0), y.size(1), off, m), ptr(k), ptr(v))


def bias_residual_(y: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> None:
    """y += b, then x += y, both in place (x: the residual stream, y's shape)."""
    if not _epilogue_ok(y, b, x) or x.shape != y.shape:
        x.add_(y.add_(b))
        return
    lib().rlhfkit_bias_residual(ptr(y), ptr(b), ptr(x), *i64(*y.shape))


def _vocab_rows(logits: torch.Tensor, ids: torch.Tensor) -> tuple[int, int, int, int, int] | None:
    """rows_of(logits) for (B, T, V) logits with (B, T) ids; None otherwise."""
    return rows_of(logits) if logits.dim() == 3 and ids.shape == logits.shape[:2] else None


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
    """log softmax(logits)[ids] for logits (B, T, V) (a view with contiguous rows of V is read in place) and
    ids (B, T), in one pass of ours, no autograd; None where our kernels are off or this does not apply
    (logits that need gradients, not float32, rows not contiguous)."""
    rows = None if logits.requires_grad or not native_ok(logits) else _vocab_rows(logits, ids)
    if rows is None:
        return None
    d0, d1, V, s0, s1 = rows
    ids = ids.to(torch.int64).contiguous()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        return None  # torch's gather raises the error
    out = torch.empty(ids.shape, dtype=torch.float32)
    lib().rlhfkit_token_logprobs(ptr(logits), *i64(d0, d1, V, s0, s1), ptr(ids), ptr(out))
    return out


def logz_backward(logits: torch.Tensor, ids: torch.Tensor, logz: torch.Tensor, grad: torch.Tensor,
                  inv_t: float) -> torch.Tensor | None:
    """grad / T * (onehot(ids) - exp(logits / T - logz)), the logits' gradient of logprobs_given_logz, in
    one pass of ours, laid out as the logits are (a view with contiguous rows of V is read in place); None
    where our kernels are off or this does not apply."""
    rows = _vocab_rows(logits, ids) if native_ok(logits, logz, grad) else None
    if rows is None:
        return None
    d0, d1, V, s0, s1 = rows
    # Laid out as the logits are (dimensions in the order of their strides), also when the logits are a
    # micro-batch's rows of a larger time-major tensor: what reads the gradient next then copies nothing.
    order = sorted(range(3), key=lambda d: -logits.stride(d))
    out = logits.new_empty([logits.size(d) for d in order]).permute([order.index(d) for d in range(3)])
    ids, logz, grad = ids.to(torch.int64).contiguous(), logz.contiguous(), grad.contiguous()
    lib().rlhfkit_logz_backward(ptr(logits), *i64(d0, d1, V, s0, s1), ptr(logz), ptr(grad), ptr(ids),
                                ctypes.c_float(inv_t), ptr(out), *i64(out.stride(0), out.stride(1)))
    return out


def grad_norm(tensors: list[torch.Tensor]) -> float | None:
    """The 2-norm of all of `tensors` together (contiguous CPU float32) in one pass of ours; None where
    our kernels are off or a tensor is not such (then torch.nn.utils.get_total_norm)."""
    if not tensors or not native_ok(*tensors) or not all(t.is_contiguous() for t in tensors):
        return None
    ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])
    out = ctypes.c_double()
    lib().rlhfkit_sum_squares(ptrs, sizes, ctypes.c_int64(len(tensors)), ctypes.byref(out))
    return math.sqrt(out.value)


def sample_rows(logits: torch.Tensor, temperature: float, u: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Plain sampling of one token per row of logits (B, V) at uniforms u (B, 1), in one pass of ours:
    (tokens, log-probs, log Z, entropies), each (B,), as rollout.sample_next computes them with torch's
    ops; None where the kernels do not apply (then the caller takes torch's)."""
    if (not native_ok(logits, u) or logits.dim() != 2 or not logits.is_contiguous() or u.dim() != 2
            or u.shape != (logits.size(0), 1)):
        return None
    B, V = logits.shape
    tok = torch.empty(B, dtype=torch.int64)
    lp, logz, ent = logits.new_empty(B), logits.new_empty(B), logits.new_empty(B)
    lib().rlhfkit_sample_rows(ptr(logits), *i64(B, V), ctypes.c_float(temperature), ptr(u), *i64(u.stride(0)),
                              ptr(tok), ptr(lp), ptr(logz), ptr(ent))
    return tok, lp, logz, ent


# A whole GPT-2 decode step (rlhfkit_gpt2_step): its arguments, as the C structs lay them out.
class Gpt2Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("ln1_w", "ln1_b", "attn_w", "attn_b", "proj_w", "proj_b",
                                                 "ln2_w", "ln2_b", "fc_w", "fc_b", "mproj_w", "mproj_b")] + [
        ("eps1", ctypes.c_double), ("eps2", ctypes.c_double), ("rec", ctypes.c_void_p * 4),
        ("rec_o", ctypes.c_void_p), ("rec_lse", ctypes.c_void_p)]


class Gpt2Step(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "D", "H", "hd", "F", "V", "T", "L")] + [
        ("wte", ctypes.c_void_p), ("wpe", ctypes.c_void_p), ("lnf_w", ctypes.c_void_p), ("lnf_b", ctypes.c_void_p),
        ("eps_f", ctypes.c_double), ("head_w", ctypes.c_void_p), ("head_b", ctypes.c_void_p),
        ("KV", ctypes.c_void_p), ("key_ok", ctypes.c_void_p),
        ("x", ctypes.c_void_p), ("h", ctypes.c_void_p), ("o", ctypes.c_void_p), ("g", ctypes.c_void_p),
        ("scores", ctypes.c_void_p), ("scr", ctypes.c_void_p * 4), ("sgemm", ctypes.c_void_p),
        ("split_cols", ctypes.c_int64), ("layer", ctypes.POINTER(Gpt2Layer))]


def sgemm_works(address: int) -> bool:
    """True if the function at `address`, called as a BLAS sgemm_ by our kernels, multiplies two small
    matrices (plain and with the second transposed) as torch.mm does."""
    if lib() is None or sys.byteorder != "little":
        return False
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(3, 5, generator=g), torch.randn(5, 7, generator=g)
    for wt, weight in ((0, w), (1, w.t().contiguous())):
        c = torch.full((3, 7), float("nan"))
        lib().rlhfkit_mm_rows(ctypes.c_void_p(address), ptr(a), ptr(weight), ptr(c), *i64(3, 5, 7), ctypes.c_int(wt))
        if not torch.allclose(c, a @ w, atol=1e-5):
            return False
    return True


def split_cols() -> int:
    """1 where the decode step (rlhfkit_gpt2_step) should split each product's columns between torch's
    threads itself, each thread calling sgemm on its share (mm_cols in kernels.c): torch's BLAS is MKL,
    which runs on the calling thread alone inside a parallel region, and at a decode step's 64 rows that
    beats MKL's own threading (alone, hot in cache: 298-360 -> 358-388 GFLOP/s at the trl-peer policy's
    shapes). 0 elsewhere: a BLAS with threads of its own would start them from each of ours."""
    return int(torch.backends.mkl.is_available())


def sgemm_address() -> int | None:
    """The address of the BLAS sgemm_ that torch's CPU matmuls call (MKL's, exported by libtorch_cpu on
    x86 builds) once `sgemm_works`; None where torch has none we can find, it does not work, or our
    kernels are off."""
    if "sgemm" not in _state:
        _state["sgemm"] = None
        path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
        try:
            address = ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            return None
        _state["sgemm"] = address if sgemm_works(address) else None
    return _state["sgemm"]


# Packed products (MKL's cblas_sgemm_pack / cblas_sgemm_compute, exported by libtorch_cpu on x86 builds).
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS, _CBLAS_PACKED, _CBLAS_B_MATRIX = 101, 111, 112, 151, 162


def _packed_api() -> tuple | None:
    """(get_size, pack, compute) of MKL's packed sgemm with their argument types, once they pass a check;
    None where torch's library has none, they fail it, or our kernels are off."""
    if lib() is None:
        return None
    if "packed" not in _state:
        _state["packed"] = None
        try:
            torch_lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
            fns = torch_lib.cblas_sgemm_pack_get_size, torch_lib.cblas_sgemm_pack, torch_lib.cblas_sgemm_compute
        except (OSError, AttributeError):
            return None
        c_int, c_ptr = ctypes.c_int, ctypes.c_void_p
        fns[0].restype, fns[0].argtypes = ctypes.c_size_t, [c_int] * 4
        fns[1].restype, fns[1].argtypes = None, [c_int] * 6 + [ctypes.c_float, c_ptr, c_int, c_ptr]
        fns[2].restype, fns[2].argtypes = None, [c_int] * 6 + [c_ptr, c_int, c_ptr, c_int, ctypes.c_float, c_ptr, c_int]
        _state["packed"] = fns
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g)
        if not torch.allclose(PackedWeight(w, 3).mm(x, torch.full((3, 7), float("nan"))), x @ w.t(), atol=1e-5):
            _state["packed"] = None
    return _state["packed"]


def packed_ok(*tensors: torch.Tensor) -> bool:
    """True if PackedWeight applies: CPU float32 tensors, our kernels on, MKL's packed sgemm found and working."""
    return native_ok(*tensors) and _packed_api() is not None


class PackedWeight:
    """A weight W (N, K) packed once for MKL's packed sgemm, for products x (M, K) @ W^T at a fixed number
    of rows M: a product then does not repack W, which at a decode step's few rows is most of its cost
    (SmolLM2-135M, 32 rows, 2 cores: 100 ms -> 71 ms a step for all of its matmuls). The packed copy
    lives in an anonymous memory mapping of the size MKL asks for; only the pages MKL writes (about W's
    own size) become resident. `repack(w)` writes a changed W of the same shape into the same memory."""

    def __init__(self, w: torch.Tensor, m: int) -> None:
        import mmap

        get_size = _packed_api()[0]
        self.m, (self.n, self.k) = m, w.shape
        self._map = mmap.mmap(-1, max(int(get_size(_CBLAS_B_MATRIX, m, self.n, self.k)), 1))
        self._buf = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(self._buf)
        self.repack(w)

    def repack(self, w: torch.Tensor) -> None:
        w = w.detach().contiguous()
        if w.shape != (self.n, self.k):
            raise ValueError(f"PackedWeight of {(self.n, self.k)}, given {tuple(w.shape)}")
        _packed_api()[1](_CBLAS_ROW_MAJOR, _CBLAS_B_MATRIX, _CBLAS_TRANS, self.m, self.n, self.k, 1.0,
                         w.data_ptr(), self.k, self.address)

    def mm(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (M, N) = x (M, K) @ W^T; both contiguous (checked), out written whole."""
        if (x.shape != (self.m, self.k) or out.shape != (self.m, self.n) or not x.is_contiguous()
                or not out.is_contiguous()):
            raise ValueError(f"PackedWeight ({self.m} rows, {self.n} x {self.k}): x {tuple(x.shape)}, out "
                             f"{tuple(out.shape)}, both contiguous")
        _packed_api()[2](_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_PACKED, self.m, self.n, self.k, x.data_ptr(),
                         self.k, self.address, self.k, 0.0, out.data_ptr(), self.n)
        return out


# Attention of a training pass (rlhfkit_attention_forward / _backward): its arguments, as kernels.c lays them out.
class AttnView(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("st", ctypes.c_int64)]


_ATTN_VIEWS = ("q", "k1", "v1", "k2", "v2", "o", "dout", "dq", "dk1", "dv1", "dk2", "dv2")


class AttnArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "H", "hd", "m", "n1", "n2", "G")] + [
        ("scale", ctypes.c_float)] + [(n, AttnView) for n in _ATTN_VIEWS] + [
        ("key_ok", ctypes.c_void_p), ("ok_stride", ctypes.c_int64), ("lse", ctypes.c_void_p)]


def attention_width_ok(hd: int) -> bool:
    """A head width our attention kernels take: a multiple of 16 (their vectors) up to 256."""
    return hd % 16 == 0 and hd <= 256


def attention_ok(q: torch.Tensor, *views: torch.Tensor | None) -> bool:
    """Our attention kernels apply: CPU float32 (rows, heads, positions, hd) views with contiguous rows of
    hd, a width attention_width_ok takes."""
    ts = [q, *(t for t in views if t is not None)]
    hd = q.size(-1)
    return (native_ok(*ts) and all(t.dim() == 4 and t.stride(-1) == 1 and t.size(-1) == hd for t in ts)
            and attention_width_ok(hd))


def _attn_args(q, k2, v2, k1, v1, key_ok, G, scale, lse, **views) -> AttnArgs:
    B, H, m, hd = q.shape
    n1 = 0 if k1 is None else k1.size(2)
    args = AttnArgs(B, H, hd, m, n1, k2.size(2), G, scale)
    for name, t in dict(q=q, k1=k1, v1=v1, k2=k2, v2=v2, **views).items():
        if t is not None:
            setattr(args, name, AttnView(t.data_ptr(), *t.stride()[:3]))
    if key_ok is not None:
        args.key_ok, args.ok_stride = key_ok.data_ptr(), key_ok.stride(0)
    args.lse = lse.data_ptr()
    return args


def attention_forward(q: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, k1: torch.Tensor | None,
                      v1: torch.Tensor | None, key_ok: torch.Tensor | None, G: int, scale: float,
                      o: torch.Tensor) -> torch.Tensor:
    """o (B, H, m, hd, any strides with rows of hd contiguous) = attention of q (B, H, m, hd) over the keys
    k1 (B / G, H, n1, hd: each G rows' shared prefix, or None) then k2 (B, H, n2, hd) with values v1, v2,
    causal over k2 (query i is position n2 - m + i), masked by key_ok (B, n1 + n2, bool, rows contiguous;
    None: all real; a query always sees its own key); returns the log-sum-exp (B, H, m). Callers check
    attention_ok first."""
    lse = q.new_empty(q.shape[:3])
    lib().rlhfkit_attention_forward(ctypes.byref(_attn_args(q, k2, v2, k1, v1, key_ok, G, scale, lse, o=o)))
    return lse


def attention_backward(q, k2, v2, k1, v1, key_ok, G: int, scale: float, o, lse, dout, dq, dk2, dv2, dk1, dv1) -> None:
    """The gradients of attention_forward written into dq (B, H, m, hd), dk2, dv2 (B, H, n2, hd) and dk1,
    dv1 (B / G, H, n1, hd: summed over each group's rows), every entry, at their own strides."""
    lib().rlhfkit_attention_backward(ctypes.byref(_attn_args(
        q, k2, v2, k1, v1, key_ok, G, scale, lse, o=o, dout=dout, dq=dq, dk1=dk1, dv1=dv1, dk2=dk2, dv2=dv2)))
