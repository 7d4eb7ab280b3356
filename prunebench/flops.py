"""FLOPs per sample and per stage: measured by torch's FlopCounterMode in a separate, untimed pass, and the
analytic count the papers use.

Measured: the sample's `generate` runs once more under torch's FlopCounterMode (`TotalFlopCounter`: the total
alone, equal to the stock counter's), after the timed run, with the run's own timing hooks reading the counter
instead of a clock: the span `vision`
(vision tower entry -> projector output, in-encoder merges inside it), `method` (the pruning subroutine and
the signals it computes), `llm` (each call of the decoder stack: the first is the prefill, the rest decode
steps). FlopCounterMode counts matrix products and convolutions (2 FLOPs per multiply-add); attention is
counted as its two products QKᵀ and AV over the full score matrix (torch's own formula for the CUDA SDPA
kernels; `CPU_SDPA` adds the same for the CPU kernel, which torch leaves uncounted); element-wise work
(norms, activations, RoPE, softmax) is not counted.

Analytic (FastV §4, per decoder layer over the n tokens entering it): 2n·d·(2d + 2d_kv) for the q/k/v/o
projections (GQA: d_kv = kv heads × head dim), 4n²d for QKᵀ and AV, and 2n·d·m per MLP matrix (m the MLP
width; 3 matrices in a gated MLP): FastV's 4nd² + 2n²d + 2ndm in multiply-adds, with the model's own
shapes, counted at each layer's real length (read by a hook in the counting pass), so multi-layer methods
are counted layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch._C import DispatchKey
from torch.utils.flop_counter import FlopCounterMode

try:  # private to torch: the lean counter below needs it; without it the stock counter counts (slower, equal)
    from torch.utils.flop_counter import _FlopCounterMode
except ImportError:  # pragma: no cover - another torch than the pinned one
    _FlopCounterMode = None

from prunebench.seams import Seams
from prunebench.timing import Timer


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """QKᵀ and AV of `aten._scaled_dot_product_flash_attention_for_cpu` (shapes [B, H, S, D]; GQA keys may
    have fewer heads: every query head multiplies its own copy), 2 FLOPs per multiply-add."""
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (d_q + d_v)


def _custom_formulas() -> dict[Any, Any]:
    import torch

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu_flops} if op is not None else {}


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to the global total alone. The tracker
    hooks every module call to build a per-module table that is never read here."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_DECOMPOSES: dict[Any, bool] = {}  # OpOverload -> has a CompositeImplicitAutograd kernel (fixed per op)


class _Dispatch(_FlopCounterMode or object):  # type: ignore[misc]
    """torch's counting mode, with one shortcut: the stock mode tries `func.decompose` (entering itself again)
    on every op outside its formula table; an op with no CompositeImplicitAutograd kernel returns NotImplemented
    there, every time, so such ops are remembered and run and counted directly. Same ops, same counts."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if _DECOMPOSES.get(func) is False:
            kwargs = kwargs or {}
            return self.counter._count_flops(func._overloadpacket, func(*args, **kwargs), args, kwargs)
        if func not in _DECOMPOSES and isinstance(func, torch._ops.OpOverload) and func not in _SIZE_QUERIES:
            key = DispatchKey.CompositeImplicitAutograd
            _DECOMPOSES[func] = key in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(
                func.name(), key)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _size_queries() -> frozenset[Any]:
    """The metadata ops the stock mode hands back (NotImplemented) before anything else: never shortcut."""
    aten, prim = torch.ops.aten, torch.ops.prim
    return frozenset({aten.sym_is_contiguous.default, aten.is_contiguous.default, aten.is_contiguous.memory_format,
                      aten.is_strides_like_format.default, aten.is_non_overlapping_and_dense.default,
                      aten.size.default, aten.sym_size.default, aten.stride.default, aten.sym_stride.default,
                      aten.storage_offset.default, aten.sym_storage_offset.default, aten.numel.default,
                      aten.sym_numel.default, aten.dim.default, prim.layout.default})


_SIZE_QUERIES = _size_queries()


class TotalFlopCounter(FlopCounterMode):
    """FlopCounterMode for the total alone (`get_total_flops`), about 1.5x cheaper on a small model: no
    per-module tracking and no repeated decomposition attempts. Its totals equal the stock counter's
    (tests/test_flops.py); it reads torch's private `_FlopCounterMode`, so torch is pinned."""

    def __init__(self, custom_mapping: dict[Any, Any] | None = None) -> None:
        super().__init__(display=False, custom_mapping=custom_mapping)
        self.mod_tracker = _GlobalOnly()  # type: ignore[assignment]

    def __enter__(self) -> TotalFlopCounter:
        if _FlopCounterMode is None:
            return super().__enter__()
        self.flop_counts.clear()
        self.mode = _Dispatch(self)
        self.mode.__enter__()
        return self


def layer_flops(n: int, d: int, d_kv: int, m: int, mlp_matrices: int) -> int:
    """Analytic prefill FLOPs of one decoder layer over n tokens (2 per multiply-add)."""
    return 2 * n * d * (2 * d + 2 * d_kv) + 4 * n * n * d + 2 * n * d * m * mlp_matrices


def decoder_shapes(seams: Seams) -> tuple[int, int, int, int]:
    """(d, d_kv, m, MLP matrices) of the decoder, read from its first layer's modules."""
    layer = seams.decoder_layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.q_proj.in_features
    d_kv = attn.k_proj.out_features
    matrices = [p for p in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2") if hasattr(mlp, p)]
    first = getattr(mlp, matrices[0])
    m = first.out_features if matrices[0] != "down_proj" else first.in_features
    return d, d_kv, m, len(matrices)


def analytic_prefill(lengths: list[int], shapes: tuple[int, int, int, int]) -> int:
    d, d_kv, m, k = shapes
    return sum(layer_flops(n, d, d_kv, m, k) for n in lengths)


@contextmanager
def _layer_lengths(seams: Seams) -> Iterator[list[int]]:
    """The number of tokens entering each decoder layer at its first call (the prefill)."""
    lengths: list[int] = [0] * len(seams.decoder_layers)
    seen = [False] * len(seams.decoder_layers)

    def hook(j: int) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not seen[j]:
                hidden = args[0] if args else kwargs["hidden_states"]
                lengths[j], seen[j] = int(hidden.shape[1]), True
        return pre

    handles = [layer.register_forward_pre_hook(hook(j), with_kwargs=True)
               for j, layer in enumerate(seams.decoder_layers)]
    try:
        yield lengths
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _llm_spans(seams: Seams, timer: Timer) -> Iterator[None]:
    handles = [seams.language_model.register_forward_pre_hook(lambda m, a: timer.start("llm")),
               seams.language_model.register_forward_hook(lambda m, a, o: timer.stop("llm"))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def count_flops(run: Callable[[], Any], seams: Seams, timer: Timer) -> dict[str, Any]:
    """Run `run()` (the sample's generate) under FlopCounterMode with `timer` reading the counter; the
    per-stage measured FLOPs and the analytic LLM prefill count (the `flops` field of a prediction row)."""
    counter = TotalFlopCounter(custom_mapping=_custom_formulas())
    with counter, timer.counting(counter.get_total_flops), _llm_spans(seams, timer), \
            _layer_lengths(seams) as lengths:
        run()
        spans, llm = timer.seconds(), timer.spans("llm")
    analytic = analytic_prefill(lengths, decoder_shapes(seams))
    return {"total": int(counter.get_total_flops()), "vision": int(spans.get("vision", 0)),
            "method": int(spans.get("method", 0)), "llm_prefill": int(llm[0]) if llm else 0,
            "decode": int(sum(llm[1:])), "analytic_llm_prefill": analytic, "layer_lengths": lengths}


def flops_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's `flops`: means per sample of each measured stage and of the analytic prefill count."""
    counted = [r["flops"] for r in rows if r.get("flops")]
    if not counted:
        return {}
    names = [k for k in counted[0] if k not in ("layer_lengths", "reused")]
    return {**{k: sum(c[k] for c in counted) / len(counted) for k in names}, "n_counted": len(counted),
            "n_measured": sum(not c.get("reused") for c in counted)}  # the others: a counted sample's shapes

