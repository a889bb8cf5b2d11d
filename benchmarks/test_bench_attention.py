"""pytest-benchmark: numba_flash vs PyTorch SDPA backends vs naive attention (GPU only).

    python -m pytest benchmarks/ --benchmark-group-by=group

One benchmark group per configuration (d, N, dtype, pass), one row per implementation. Shapes follow
the issue: batch × seqlen = 16384 tokens, hidden 2048 (H = 32 at d = 64), non-causal. The timed
function synchronizes CUDA before it returns, so pytest-benchmark's host clock sees the GPU work.
Inputs, implementations and the n/a rules come from :mod:`numba_flash.bench`; for TFLOP/s tables
over the full sweep use ``python -m numba_flash.bench`` (CUDA-event timing).
"""

import os

import pytest

torch = pytest.importorskip("torch")
if os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0"):
    pytest.skip("benchmarks need a real GPU, not Numba's CUDA simulator", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("benchmarks need a CUDA GPU (torch.cuda.is_available() is False)",
                allow_module_level=True)

from numba_flash import bench  # noqa: E402  (after the skips: needs torch with CUDA)

TOKENS, HIDDEN, HEADDIM = 16384, 2048, 64
CONFIGS = [(n, dtype) for dtype in ("float16", "float32") for n in (1024, 4096)]
PASSES = ("fwd", "fwd+bwd")


@pytest.mark.parametrize("impl", bench.DEFAULT_IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("seqlen,dtype", CONFIGS, ids=[f"N{n}-{t}" for n, t in CONFIGS])
def test_attention_speed(benchmark, seqlen, dtype, pass_, impl):
    cfg = bench.Config.from_tokens(TOKENS, HIDDEN, seqlen, HEADDIM, dtype, causal=False)
    benchmark.group = f"d={HEADDIM} N={seqlen} {dtype} {pass_} (B={cfg.batch}, H={cfg.nheads})"
    q, k, v, dout = bench.make_inputs(cfg)
    try:
        forward, context = bench.make_forward(impl, q, k, v, causal=False)
    except bench.Unavailable as e:
        pytest.skip(f"{impl}: {e}")
    status, note = bench.probe(forward, context)
    if status != "ok":
        pytest.skip(f"{impl} {status} for {cfg.label()}: {note}")

    step = bench.pass_step(pass_, forward, q, k, v, dout)

    def timed():
        q.grad = k.grad = v.grad = None  # fwd+bwd: each backward starts from empty grads
        step()
        torch.cuda.synchronize()

    with context():
        benchmark(timed)
        out = forward()
    flops = bench.attention_flops(cfg, pass_)
    benchmark.extra_info.update(impl=impl, pass_=pass_, gflop=flops / 1e9, **vars(cfg))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops_median"] = flops / stats.stats.median / 1e12
    assert out.shape == q.shape
    assert torch.isfinite(out).all(), f"{impl} produced NaN/inf"
    if pass_ == "fwd+bwd":
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))
