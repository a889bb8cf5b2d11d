"""Measuring: one implementation or a whole configuration (records of TFLOP/s, ms, peak memory, status),
checks against float64, and the block-sparse mode (time against density, FlexAttention beside).

A record is a dict: d, dtype, causal, seqlen, batch, nheads, impl, pass, status ("ok", "n/a", "OOM",
"error"), ms, tflops, note (and mem_mib for the forward). A backend that refuses a configuration
(flash with float32, ...) is "n/a"; one that runs out of memory (naive attention at large N) "OOM".
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import numba_flash

from .impls import Unavailable, make_forward, make_inputs, pass_step
from .problem import CHECK_TOL, OWN_FP32_TOL, OWN_IMPLS, Config, attention_flops
from .timing import Timing, first_line, forward_peak_mib, free_memory, probe


def record(cfg: Config, impl: str, pass_: str, status: str, ms=None, mem_mib=None, note=""):
    rec = {"d": cfg.headdim, "dtype": cfg.dtype, "causal": cfg.causal, "seqlen": cfg.seqlen,
           "batch": cfg.batch, "nheads": cfg.nheads, "impl": impl, "pass": pass_,
           "status": status, "ms": ms, "tflops": None, "note": note}
    if ms:
        rec["tflops"] = attention_flops(cfg, pass_) / (ms * 1e-3) / 1e12
    if pass_ == "fwd":
        rec["mem_mib"] = mem_mib
    return rec


def _time_pass(pass_, forward, q, k, v, dout, timing: Timing) -> float:
    step = pass_step(pass_, forward, q, k, v, dout)
    try:
        return timing.median_ms(step, grad_to_none=(q, k, v) if pass_ == "fwd+bwd" else ())
    finally:
        del step


def measure_impl(impl: str, cfg: Config, q, k, v, dout, passes, timing: Timing,
                 block_mask=None) -> list[dict]:
    """Records (one per pass) for one implementation on prepared inputs."""
    try:
        forward, context = make_forward(impl, q, k, v, cfg.causal, block_mask=block_mask)
    except Unavailable as e:
        return [record(cfg, impl, p, "n/a", note=str(e)) for p in passes]
    status, note = probe(forward, context)
    if status != "ok":
        return [record(cfg, impl, p, status, note=note) for p in passes]

    records, times = [], {}
    with context():
        mem = None
        if "fwd" in passes:
            try:
                mem = forward_peak_mib(forward)
            except torch.cuda.OutOfMemoryError:
                free_memory()
                return [record(cfg, impl, p, "OOM") for p in passes]
        # fwd and fwd+bwd first: bwd falls back to their difference if autograd.grad fails.
        for pass_ in sorted(passes, key=("fwd", "fwd+bwd", "bwd").index):
            note = ""
            try:
                try:
                    ms = _time_pass(pass_, forward, q, k, v, dout, timing)
                except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
                    if pass_ != "bwd" or isinstance(e, torch.cuda.OutOfMemoryError):
                        raise
                    # autograd.grad with retain_graph refused: backward = (fwd+bwd) - fwd.
                    for p in ("fwd", "fwd+bwd"):
                        if p not in times:
                            times[p] = _time_pass(p, forward, q, k, v, dout, timing)
                    ms = times["fwd+bwd"] - times["fwd"]
                    # (flex: torch.compile donates the saved buffers to its one backward.)
                    note = (f"bwd = (fwd+bwd) − fwd: autograd.grad(retain_graph=True) refused: "
                            f"{first_line(e, 90)}")
                times[pass_] = ms
                records.append(record(cfg, impl, pass_, "ok", ms,
                                       mem if pass_ == "fwd" else None, note))
            except torch.cuda.OutOfMemoryError:
                free_memory()
                records.append(record(cfg, impl, pass_, "OOM", mem_mib=mem))
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
                free_memory()
                records.append(record(cfg, impl, pass_, "n/a", note=first_line(e)))
            except Exception as e:
                free_memory()
                records.append(record(cfg, impl, pass_, "error", note=first_line(e)))
    free_memory()
    return records


def measure_config(cfg: Config, impls, passes, timing: Timing, seed=0) -> list[dict]:
    """Records for every (impl, pass) of one configuration, on one set of random inputs."""
    try:
        q, k, v, dout = make_inputs(cfg, seed=seed)
    except torch.cuda.OutOfMemoryError:
        free_memory()
        return [record(cfg, i, p, "OOM", note="inputs") for i in impls for p in passes]
    records = []
    for impl in impls:
        records += measure_impl(impl, cfg, q, k, v, dout, passes, timing)
    del q, k, v, dout
    free_memory()
    return records


def rel_err(x, ref) -> float:
    x = x.detach().to(torch.float64)
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def reference_outputs(q, k, v, dout, causal):
    """``(out, dq, dk, dv)`` in float64 from SDPA's math backend on upcast copies, (B, N, H, d)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q64, k64, v64 = (x.detach().to(torch.float64).requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q64.transpose(1, 2), k64.transpose(1, 2),
                                             v64.transpose(1, 2), is_causal=causal).transpose(1, 2)
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.to(torch.float64))
    return (out.detach(), *grads)


def check_impl(impl: str, cfg: Config, q, k, v, dout, ref) -> dict:
    """Relative errors of out, dq, dk, dv of ``impl`` against ``ref`` (from reference_outputs)."""
    own = impl in OWN_IMPLS
    tol = OWN_FP32_TOL if (own and cfg.dtype == "float32") else CHECK_TOL[cfg.dtype]
    rec = {"impl": impl, "d": cfg.headdim, "dtype": cfg.dtype, "causal": cfg.causal,
           "seqlen": cfg.seqlen, "batch": cfg.batch, "nheads": cfg.nheads, "tol": tol,
           "status": "ok", "note": "", "errors": {}}
    try:
        forward, context = make_forward(impl, q, k, v, cfg.causal)
        with context():
            out = forward()
            grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
    except Unavailable as e:
        rec.update(status="n/a", note=str(e))
        return rec
    except torch.cuda.OutOfMemoryError:
        free_memory()
        rec.update(status="OOM")
        return rec
    except Exception as e:
        free_memory()
        refused = isinstance(e, (RuntimeError, ValueError, TypeError, NotImplementedError))
        rec.update(status="n/a" if refused else "error", note=first_line(e))
        return rec
    rec["errors"] = {name: rel_err(x, r)
                     for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), ref)}
    worst = max(rec["errors"].values())
    if not worst <= tol:  # NaN fails too
        rec["status"] = "FAIL"
    return rec


def check_config(cfg: Config, impls, seed=1) -> list[dict]:
    """Check every implementation at ``cfg`` against float64 SDPA math on the same inputs."""
    q, k, v, dout = make_inputs(cfg, seed=seed)
    ref = reference_outputs(q, k, v, dout, cfg.causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA's refusal warnings: the status says n/a
        records = [check_impl(impl, cfg, q, k, v, dout, ref) for impl in impls]
    del q, k, v, dout, ref
    free_memory()
    return records


def sparse_masks(seqlen: int, densities, block_size=(128, 128)):
    """``[(pattern, mask)]``: random masks at each density, then the butterfly pattern."""
    BlockMask = numba_flash.BlockMask
    masks = [("random", BlockMask.random(rho, seed=0, seqlen_q=seqlen, seqlen_k=seqlen,
                                         block_size=block_size)) for rho in densities]
    masks.append(("butterfly", BlockMask.butterfly(seqlen_q=seqlen, seqlen_k=seqlen,
                                                   block_size=block_size)))
    return masks


def _sparse_record(cfg, impl, pattern, density, pass_, status, ms=None, note=""):
    rec = {"mode": "sparse", "d": cfg.headdim, "dtype": cfg.dtype, "seqlen": cfg.seqlen,
           "batch": cfg.batch, "nheads": cfg.nheads, "impl": impl, "pattern": pattern,
           "density": density, "pass": pass_, "status": status, "ms": ms, "note": note,
           "tflops_effective": None}
    if ms:
        rec["tflops_effective"] = attention_flops(cfg, pass_) * density / (ms * 1e-3) / 1e12
    return rec


def measure_sparse(cfg: Config, densities, passes, timing: Timing, impls=("numba_flash", "flex"),
                   seed=0) -> list[dict]:
    """Time ``impls`` dense and under each mask of :func:`sparse_masks`; for the forward pass also
    the agreement ``‖numba_flash − flex‖/‖flex‖`` on the same inputs (proves the masks match)."""
    q, k, v, dout = make_inputs(cfg, seed=seed)
    records = []
    cases = [("dense", None)] + sparse_masks(cfg.seqlen, densities)
    for pattern, mask in cases:
        density = 1.0 if mask is None else float(mask.density)
        outs, case = {}, []
        for impl in impls:
            rows = measure_impl(impl, cfg, q, k, v, dout, passes, timing, block_mask=mask)
            case += [_sparse_record(cfg, impl, pattern, density, r["pass"], r["status"], r["ms"],
                                    r["note"]) for r in rows]
            if all(r["status"] == "ok" for r in rows):
                forward, context = make_forward(impl, q, k, v, False, block_mask=mask)
                with context(), torch.no_grad():
                    outs[impl] = forward().float()
        if {"numba_flash", "flex"} <= outs.keys():
            a, b = outs["numba_flash"], outs["flex"]
            err = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
            for r in case:
                if r["impl"] == "numba_flash" and r["pass"] == "fwd":
                    r["agreement"] = err
        records += case
        del outs
        free_memory()
    del q, k, v, dout
    free_memory()
    return records
