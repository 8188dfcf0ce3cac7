"""What the paged attention kernels of cpu.py take: their ctypes entry points for one KV cache
dtype (`AttentionFns`), and the per-step argument tables of the cascade decode
(`SharedPrefixes`) and of the prefill chunks (`PrefillBatch`), as contiguous int64 tensors."""

from __future__ import annotations

import ctypes

import torch

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class AttentionFns:
    """The paged attention entry points built for one KV cache dtype (suffix "" float32,
    "_bf16" bfloat16); q, out and the shared-prefix state are float32 in both."""

    def __init__(self, lib: ctypes.CDLL, suffix: str):
        def bind(name: str, argtypes: list) -> ctypes._CFuncPtr:
            fn = getattr(lib, f"moeserve_{name}{suffix}")
            fn.restype, fn.argtypes = None, argtypes
            return fn

        f, th = ctypes.c_float, ctypes.c_int
        self.decode = bind(
            "paged_decode", [_P, _P, _P, _P, _I64, _P, _P, *[_I64] * 5, f, _P, _P, _P, th]
        )
        self.shared = bind("shared_prefix", [*[_P] * 6, _I64, _P, *[_I64] * 5, f, _P, _P, th])
        self.mqa = bind(
            "mqa_decode", [_P, _P, _P, _P, _I64, _P, _P, *[_I64] * 4, f, _P, _P, _P, th]
        )
        self.prefill = bind(
            "paged_prefill", [*[_P] * 4, _I64, _P, _P, _P, *[_I64] * 6, f, _I64, _P, th]
        )


class SharedPrefixes:
    """Groups of decoding sequences whose block tables begin with the same blocks: rows
    [starts[g], starts[g+1]) of `rows` (indices into the decode batch) share the first
    prefix_lens[g] keys, through tables[g] (int64, contiguous)."""

    __slots__ = ("rows", "starts", "tables", "prefix_lens", "row_starts")

    def __init__(self, groups: list[tuple[list[int], list[int], int]]):
        """groups: (decode rows, the shared blocks, shared keys) each."""
        rows = [r for g in groups for r in g[0]]
        self.rows = torch.tensor(rows, dtype=torch.int64)
        bounds = [0]
        for g in groups:
            bounds.append(bounds[-1] + len(g[0]))
        self.starts = torch.tensor(bounds, dtype=torch.int64)
        width = max(len(g[1]) for g in groups)
        self.tables = torch.zeros(len(groups), width, dtype=torch.int64)
        for i, g in enumerate(groups):
            self.tables[i, : len(g[1])] = torch.tensor(g[1], dtype=torch.int64)
        self.prefix_lens = torch.tensor([g[2] for g in groups], dtype=torch.int64)
        self.row_starts = torch.tensor([g[2] for g in groups for _ in g[0]], dtype=torch.int64)


class PrefillBatch:
    """The prefill chunks of a step as the prefill kernel reads them (int64, contiguous)."""

    __slots__ = ("tables", "q_starts", "q_lens", "ctx_lens")

    def __init__(self, tables: list[torch.Tensor], q_starts, q_lens, ctx_lens):
        width = max(len(t) for t in tables)
        self.tables = torch.zeros(len(tables), width, dtype=torch.int64)
        for i, t in enumerate(tables):
            self.tables[i, : len(t)] = t
        self.q_starts = torch.tensor(q_starts, dtype=torch.int64)
        self.q_lens = torch.tensor(q_lens, dtype=torch.int64)
        self.ctx_lens = torch.tensor(ctx_lens, dtype=torch.int64)
