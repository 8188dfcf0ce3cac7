"""moeserve's CPU kernels (csrc/*.c): built on first use, loaded with ctypes.

- `grouped_mm`: the expert matmuls of a MoE layer (and, as one "expert", the dense projections
  through `linear`);
- `paged_decode`: attention of decoding sequences, reading K/V in place through block tables
  (with one KV head and many query heads, MLA's absorbed form, through `mqa_decode`: the heads
  of a sequence in the vectors' lanes, tiled like a prefill chunk);
- `paged_prefill`: attention of prefill chunks over their cached context, the same way;
- `shared_prefix` (through `paged_decode`'s `shared`): cascade decode over shared blocks;
- `rms_norm`: RMSNorm (and the residual add before it) in one pass.
Their blocking (register tile rows, K chunk, query tile) comes from this CPU's caches and ISA,
and one threshold from a short calibration cached beside the library (`tuning.py`).

They are compiled with the system C compiler (`-O3 -march=native -fopenmp`) into a per-user cache
keyed by source, flags, compiler and CPU (`build.py`). The library links torch's own
libgomp (already loaded), so torch and the kernel share one OpenMP pool.

Nothing to install: with no C compiler, a failed build, or MOESERVE_CPU_KERNEL=0 (settings.py),
`load()` returns None and the callers run plain torch instead (same results up to float32 rounding).
Packed expert weights are [E, N/P, K, P] (P = `PANEL` columns): `pack` / `panel_matmul`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
import time

import torch

from serve_app.kernels import settings, tuning
from serve_app.kernels.build import open_library
from serve_app.kernels.paged_args import AttentionFns, PrefillBatch, SharedPrefixes
from serve_app.kernels.tuning import Blocking

logger = logging.getLogger(__name__)

PANEL = 32  # must match NB in the C source (checked when it loads)
# one KV head and at least this many query heads: decode through moeserve_mqa_decode (the
# heads in the vectors' lanes), else moeserve_paged_decode
MQA_MIN_HEADS = 8

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return _P(t.data_ptr())


class CpuKernels:
    def __init__(self, lib: ctypes.CDLL, blocking: Blocking):
        self.blocking = blocking
        self._mm = lib.moeserve_grouped_mm
        self._mm.restype = None
        self._mm.argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _I64, _P, _I64, _I64, ctypes.c_int]
        self._mlp = lib.moeserve_moe_mlp
        self._mlp.restype = None
        self._mlp.argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _P, _P, _P, _P, _P]
        self._mlp.argtypes += [_P, _I64, _I64, ctypes.c_int]
        # the attention kernels by KV cache dtype (bf16 rows widened as loaded: kv_elem.h)
        self._attention = {
            torch.float32: AttentionFns(lib, ""),
            torch.bfloat16: AttentionFns(lib, "_bf16"),
        }
        self._norm = lib.moeserve_rms_norm
        self._norm.restype = None
        self._norm.argtypes = [_P, _I64, _I64, _P, _P, ctypes.c_float, _I64, _I64, _P, _P]
        self._norm.argtypes += [ctypes.c_int]
        limits = lib.moeserve_paged_decode_limits
        limits.restype = _I64
        limits.argtypes = [_I64]
        (
            self.max_heads,
            self.max_head_dim,
            self.max_heads_x_dim,
            self.max_block_size,
            self.head_dim_multiple,
        ) = (limits(i) for i in range(5))
        prefill_limits = lib.moeserve_paged_prefill_limits
        prefill_limits.restype = _I64
        prefill_limits.argtypes = [_I64]
        if prefill_limits(0) != tuning.MAX_QUERY_ROWS:
            raise RuntimeError("query rows of the built prefill kernel differ from tuning's")
        lib.moeserve_max_row_tile.restype = _I64
        if lib.moeserve_max_row_tile() != tuning.MAX_ROW_TILE:
            raise RuntimeError("row tile of the built kernel differs from tuning's")
        self._one = torch.zeros(1, dtype=torch.int64)  # expert 0 / row 0 of a dense `linear`

    def grouped_mm(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        spans: list[tuple[int, int, int]],
        out: torch.Tensor,
        blocking: Blocking | None = None,
    ) -> None:
        """out[s:e] = x[s:e] @ W[local] for each (local, s, e) span, in one parallel call.

        x [R, K] and out [R, N] contiguous float32; w packed [E, N/P, K, P]."""
        starts, ends = [0] * w.shape[0], [0] * w.shape[0]
        for local, s, e in spans:  # plain lists: per-element tensor writes cost ~3 us each
            starts[local], ends[local] = s, e
        self._run_mm(
            x,
            w,
            torch.tensor(starts, dtype=torch.int64),
            torch.tensor(ends, dtype=torch.int64),
            torch.tensor([local for local, _, _ in spans], dtype=torch.int64),
            out,
            blocking or self.blocking,
        )

    def moe_mlp(
        self,
        xs: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        spans: list[tuple[int, int, int]],
        row_weights: torch.Tensor,
        dest: torch.Tensor,
        y: torch.Tensor,
        blocking: Blocking | None = None,
    ) -> None:
        """Every span's expert MLP, w * down(silu(gate) * up), in one parallel region: row r
        of the result goes to y[dest[r]].

        xs [n, D] rows sorted by expert; w13 [E, 2I/P, D, P], w2 [E, D/P, I, P] packed;
        row_weights [n] float32; dest [n] int64, distinct rows of y [S, D]."""
        n, d = xs.shape
        inter = w2.shape[2]
        starts, ends = [0] * w13.shape[0], [0] * w13.shape[0]
        for local, s, e in spans:
            starts[local], ends[local] = s, e
        starts_t = torch.tensor(starts, dtype=torch.int64)
        ends_t = torch.tensor(ends, dtype=torch.int64)
        active = torch.tensor([local for local, _, _ in spans], dtype=torch.int64)
        for t in (xs, w13, w2, row_weights, y):
            if not t.is_contiguous() or t.dtype != torch.float32:
                raise ValueError("moe_mlp needs contiguous float32 tensors")
        if dest.dtype != torch.int64 or not dest.is_contiguous() or dest.numel() != n:
            raise ValueError("moe_mlp needs one contiguous int64 destination per row")
        gate_up = xs.new_empty(n, 2 * inter)
        act = xs.new_empty(n, inter)
        down = xs.new_empty(n, d)
        b = blocking or self.blocking
        self._mlp(
            _ptr(xs), _I64(d), _ptr(starts_t), _ptr(ends_t), _ptr(active), _I64(len(spans)),
            _ptr(w13), _ptr(w2), _I64(inter), _ptr(row_weights), _ptr(dest), _ptr(gate_up),
            _ptr(act), _ptr(down), _ptr(y), _I64(b.mr), _I64(b.kc),
            ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip

    def linear(
        self, x: torch.Tensor, panels: torch.Tensor, blocking: Blocking | None = None
    ) -> torch.Tensor:
        """x [M, K] @ one packed matrix [1, N/P, K, P] -> [M, N] (a dense projection)."""
        x = x.contiguous()
        out = x.new_empty(x.shape[0], panels.shape[1] * PANEL)
        ends = torch.tensor([x.shape[0]], dtype=torch.int64)
        self._run_mm(x, panels, self._one, ends, self._one, out, blocking or self.blocking)
        return out

    def _run_mm(self, x, w, starts, ends, active, out, blocking: Blocking) -> None:
        if not (x.is_contiguous() and out.is_contiguous() and w.is_contiguous()):
            raise ValueError("grouped_mm needs contiguous tensors")
        self._mm(
            _ptr(x), _I64(w.shape[2]), _ptr(starts), _ptr(ends), _ptr(active),
            _I64(active.numel()), _ptr(w), _I64(out.shape[1]), _ptr(out),
            _I64(blocking.mr), _I64(blocking.kc), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip

    def rms_norm_applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """x [T, D] or [T, H, D] float32 on the CPU, rows contiguous (tokens may be strided),
        D a multiple of 16."""
        d = x.shape[-1]
        return (
            x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32
            and x.dim() in (2, 3)
            and d % 16 == 0
            and x.stride(-1) == 1
            and (x.dim() == 2 or x.stride(1) == d)
            and weight.is_contiguous()
        )

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(x + residual, rms_norm(x + residual)), or (None, rms_norm(x)) without a residual;
        x as rms_norm_applies says, residual (2-D only) any layout."""
        t, d = x.shape[0], x.shape[-1]
        heads = x.shape[1] if x.dim() == 3 else 1
        out = torch.empty(x.shape, dtype=x.dtype)
        summed = None
        if residual is not None:
            if heads != 1:
                raise ValueError("rms_norm with a residual takes [T, D] rows")
            residual = residual.contiguous()
            summed = torch.empty(x.shape, dtype=x.dtype)
        self._norm(
            _ptr(x), _I64(x.stride(0)), _I64(heads),
            _ptr(residual) if residual is not None else None, _ptr(weight),
            ctypes.c_float(eps), _I64(t), _I64(d),
            _ptr(summed) if summed is not None else None, _ptr(out),
            ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        return summed, out

    def paged_decode_applies(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> bool:
        """q [T, H, D] float32; k_cache [N, B, Hkv, D] float32 or bfloat16 (v_cache alike): on
        the CPU, within the kernel's sizes."""
        _, b, _, d = k_cache.shape
        return (
            q.device.type == "cpu"
            and q.dtype == torch.float32
            and k_cache.dtype == v_cache.dtype
            and k_cache.dtype in self._attention
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and q.shape[1] <= self.max_heads
            and d <= self.max_head_dim
            and q.shape[1] * d <= self.max_heads_x_dim
            and d % self.head_dim_multiple == 0
            and b <= self.max_block_size
        )

    def paged_decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        ctx_lens: torch.Tensor,
        starts: torch.Tensor,
        scale: float,
        shared: SharedPrefixes | None = None,
    ) -> torch.Tensor:
        """q [n, H, D] (one token per sequence) -> [n, H, D]; keys at positions
        [starts[i], ctx_lens[i]) of sequence i, found through block_tables [n, max_blocks].

        With `shared` (no sliding window), the sequences of each group first attend together
        to the keys their tables share (moeserve_shared_prefix: cascade attention), then each
        to the rest of its own; starts must be 0 then."""
        n, h, d = q.shape
        _, b, hkv, _ = k_cache.shape
        fns = self._attention[k_cache.dtype]
        q = q.contiguous()
        tables = block_tables.to(torch.int64).contiguous()
        lens = ctx_lens.to(torch.int64).contiguous()
        starts = starts.to(torch.int64).contiguous()
        out = torch.empty_like(q)
        init_out = init_lse = None
        if shared is not None:
            init_out = torch.zeros_like(q)
            init_lse = torch.full((n, h), float("-inf"))
            fns.shared(
                _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(shared.rows), _ptr(shared.starts),
                _ptr(shared.tables), _I64(shared.tables.shape[1]), _ptr(shared.prefix_lens),
                _I64(len(shared.prefix_lens)), _I64(h), _I64(hkv), _I64(d), _I64(b),
                ctypes.c_float(scale), _ptr(init_out), _ptr(init_lse),
                ctypes.c_int(torch.get_num_threads()),
            )  # fmt: skip
            starts = starts.clone()
            starts[shared.rows] = shared.row_starts
        init = (
            _ptr(init_out) if init_out is not None else None,
            _ptr(init_lse) if init_lse is not None else None,
        )
        if hkv == 1 and h >= MQA_MIN_HEADS:
            fns.mqa(
                _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(tables), _I64(tables.shape[1]),
                _ptr(lens), _ptr(starts), _I64(n), _I64(h), _I64(d), _I64(b),
                ctypes.c_float(scale), _ptr(out), *init, ctypes.c_int(torch.get_num_threads()),
            )  # fmt: skip
            return out
        fns.decode(
            _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(tables), _I64(tables.shape[1]),
            _ptr(lens), _ptr(starts), _I64(n), _I64(h), _I64(hkv), _I64(d), _I64(b),
            ctypes.c_float(scale), _ptr(out), *init, ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        return out

    def paged_prefill(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seqs: PrefillBatch,
        scale: float,
        window: int | None,
        out: torch.Tensor,
        blocking: Blocking | None = None,
    ) -> None:
        """Causal attention of every prefill chunk in `seqs` over its whole context (cached and
        new K/V, already in the cache): q [T, H, D] -> out [T, H, D] at the chunks' rows."""
        _, h, d = q.shape
        _, b, hkv, _ = k_cache.shape
        if not (q.is_contiguous() and out.is_contiguous()):
            raise ValueError("paged_prefill needs contiguous q and out")
        qt = (blocking or self.blocking).query_tile(h // hkv)
        self._attention[k_cache.dtype].prefill(
            _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(seqs.tables), _I64(seqs.tables.shape[1]),
            _ptr(seqs.q_starts), _ptr(seqs.q_lens), _ptr(seqs.ctx_lens), _I64(len(seqs.q_lens)),
            _I64(h), _I64(hkv), _I64(d), _I64(b), _I64(window or 0), ctypes.c_float(scale),
            _I64(qt), _ptr(out), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip


def applies(w: torch.Tensor) -> bool:
    """Whether an input-major [E, K, N] weight can be packed for the kernel here."""
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.shape[-1] % PANEL == 0
        and load() is not None
    )


def pack(w: torch.Tensor) -> torch.Tensor:
    """Input-major [E, K, N] -> panels [E, N/P, K, P] (each panel one contiguous stream)."""
    e, k, n = w.shape
    return w.reshape(e, k, n // PANEL, PANEL).permute(0, 2, 1, 3).contiguous()


def panel_matmul(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ one expert's panels [N/P, K, P] -> [M, N], with torch (MKL) batched matmuls."""
    return torch.matmul(x, panels).permute(1, 0, 2).reshape(x.shape[0], -1)


@functools.cache
def load() -> CpuKernels | None:
    """The kernels, built if needed; None where they cannot be (callers fall back to torch)."""
    env = settings.read()
    try:
        opened = open_library(env, "moeserve_panel_width", PANEL)
        if opened is None:
            return None
        lib, so = opened
        kernels = CpuKernels(lib, tuning.from_cpu(tuning.cpu_info()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernels unavailable (%s): plain torch is used instead", e)
        return None
    base = kernels.blocking
    if "mkl_rows" not in env.forced_blocking:
        calib = so.with_suffix(f".mkl_rows.{torch.__version__}.{torch.get_num_threads()}t")
        mkl_rows = tuning.cached_value(calib, lambda: _calibrate_mkl_rows(kernels))
        base = tuning.Blocking(base.mr, base.kc, base.qt, mkl_rows)
    kernels.blocking = tuning.apply_forced(base, env.forced_blocking)
    logger.info("CPU kernels: %s", kernels.blocking)
    return kernels


def _calibrate_mkl_rows(kernels: CpuKernels) -> int:
    """48 (rows) if torch's matmul beats the C kernel on a compute-bound expert group, else
    tuning.NEVER. Takes ~50 ms; the answer differs by 2-3x between CPU vendors. The two are
    timed in alternation and each keeps its best, so a neighbour's burst of load slows both
    rather than deciding the answer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 512, generator=g)
    panels = pack(torch.randn(1, 512, 1024, generator=g))
    runs = {"c": lambda: kernels.linear(x, panels), "mkl": lambda: panel_matmul(x, panels[0])}
    for f in runs.values():  # wake the thread pool, fault the pages in
        for _ in range(3):
            f()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(7):
        for name, f in runs.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    logger.info(
        "calibration: C kernel %.2f ms, torch matmul %.2f ms", best["c"] * 1e3, best["mkl"] * 1e3
    )
    return 48 if best["mkl"] < best["c"] else tuning.NEVER
