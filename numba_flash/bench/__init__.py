"""Benchmark numba_flash against PyTorch attention on one GPU: the pieces ``python -m numba_flash.bench``,
``python -m numba_flash``, ``benchmarks/`` (pytest-benchmark) and ``paper_repro`` share.

    problem   Config (shape, dtype, causal), the passes, FLOPs counted, implementation names
    impls     make_inputs, make_forward (numba_flash, naive, SDPA backends, FlexAttention), pass_step
    timing    Timing (CUDA events / triton.testing.do_bench, median, L2 flushed), peak memory, probe
    measure   measure_impl / measure_config (records), check_config (against float64), measure_sparse
    report    environment header, Markdown tables, write_report (.md + .json), progress bars
    cli       the command line (``python -m numba_flash.bench --help``)

The names below load on first use, so ``--help`` and the torch-free parts work without torch.
"""
import importlib

_NAMES = {
    "problem": ("IMPLS", "DEFAULT_IMPLS", "PASSES", "FLOP_FACTOR", "DTYPE_NAMES", "CHECK_TOL", "CHECK_SIZE",
                "Config", "attention_flops"),
    "impls": ("Unavailable", "make_inputs", "make_forward", "pass_step", "block_layout", "flex_block_mask",
              "torch_dtype"),
    "timing": ("Timing", "forward_peak_mib", "free_memory", "probe", "first_line"),
    "measure": ("record", "measure_impl", "measure_config", "reference_outputs", "rel_err", "check_impl",
                "check_config", "sparse_masks", "measure_sparse"),
    "report": ("environment", "format_header", "cell", "md_table", "format_sweep", "format_checks",
               "format_sparse", "write_report", "progress"),
    "cli": ("main", "build_parser"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'numba_flash.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
