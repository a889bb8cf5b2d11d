"""Every rejected input raises TypeError / ValueError whose message names the offending argument.

No test here needs a kernel to run except the ones checking that valid-but-unusual inputs are accepted.
"""
import math
import re

import numpy as np
import pytest

import numba_flash as nf
from numba_flash import BlockMask
from conftest import (DEFAULT_FW, SIMULATOR, assert_bitwise_equal, block_sizes, from_numpy, make_qkv_arrays,
                      mask_tile, poison, random_array, torch)


def names(arg):
    """A regex matching `arg` as a word of the message (so "q" does not match inside "seqlen")."""
    return rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])"


@pytest.fixture
def qkv(rng):
    return make_qkv_arrays(rng, 2, 17, 20, 2, 16)


def arr(rng, shape, dtype="float32", framework=None):
    return random_array(rng, shape, dtype, framework or DEFAULT_FW)


# --------------------------------------------------------------------------------------------------
# q, k, v
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which,shape,word", [
    ("k", (3, 20, 2, 16), "batch"),
    ("v", (2, 20, 3, 16), "heads"),
    ("k", (2, 20, 2, 32), "head dim"),
    ("v", (2, 21, 2, 16), "seqlen"),
])
def test_mismatched_shapes_raise_value_error_naming_the_argument_and_dim(rng, qkv, which, shape, word):
    args = dict(zip("qkv", qkv))
    args[which] = arr(rng, shape)
    with pytest.raises(ValueError, match=names(which)) as e:
        nf.flash_attn_forward(args["q"], args["k"], args["v"])
    assert word in str(e.value)


@pytest.mark.parametrize("dtype", ["int32", "complex64"])
def test_unsupported_dtype_raises_type_error_naming_q(rng, dtype):
    q = (rng.standard_normal((1, 17, 1, 16)) * 10).astype(dtype)
    if not SIMULATOR:
        q = from_numpy(q, "float32", "torch").to(getattr(torch, dtype))
    _, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16)
    with pytest.raises(TypeError, match=names("q")) as e:
        nf.flash_attn_forward(q, k, v)
    assert dtype in str(e.value)


def test_mixed_dtypes_raise_type_error_naming_the_argument(rng):
    q, k, _ = make_qkv_arrays(rng, 1, 17, 17, 1, 16)
    v = arr(rng, (1, 17, 1, 16), "float64")
    with pytest.raises(TypeError, match=names("v")):
        nf.flash_attn_forward(q, k, v)


@pytest.mark.parametrize("d", [8, 512])
def test_unsupported_head_dim_raises_value_error_naming_q_and_head_dim(rng, d):
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, d)
    with pytest.raises(ValueError, match="head dim") as e:
        nf.flash_attn_forward(q, k, v)
    assert str(d) in str(e.value)
    assert re.search(names("q"), str(e.value)), f"message does not name q: {e.value}"


def test_three_dimensional_input_raises_value_error_naming_it(rng):
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16)
    with pytest.raises(ValueError, match=names("k")):
        nf.flash_attn_forward(q, k[0], v)


def test_non_contiguous_head_dim_raises_value_error_naming_it(rng):
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 32)
    with pytest.raises(ValueError, match=names("q")):
        nf.flash_attn_forward(q[..., ::2], k[..., :16], v[..., :16])


@pytest.mark.skipif(not SIMULATOR, reason="numpy inputs exist under the simulator only")
def test_negative_strides_raise_value_error_naming_the_argument(rng):
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16, framework="numpy")
    with pytest.raises(ValueError, match=names("k")):
        nf.flash_attn_forward(q, k[:, ::-1], v)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_non_finite_softmax_scale_raises_value_error_naming_it(qkv, scale):
    with pytest.raises(ValueError, match="softmax_scale"):
        nf.flash_attn_forward(*qkv, softmax_scale=scale)


@pytest.mark.parametrize("scale", [[0.5], "0.5", True])
def test_non_numeric_softmax_scale_raises_type_error_naming_it(qkv, scale):
    with pytest.raises(TypeError, match="softmax_scale"):
        nf.flash_attn_forward(*qkv, softmax_scale=scale)


def test_non_finite_scale_through_torch_autograd_path_raises_value_error(rng):
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16, framework="torch")
    with pytest.raises(ValueError, match="softmax_scale"):
        nf.flash_attn_func(q, k, v, softmax_scale=float("nan"))


@pytest.mark.skipif(not SIMULATOR, reason="numpy inputs exist under the simulator only")
def test_mixed_frameworks_numpy_q_torch_k_raise_type_error_naming_k(rng):
    q, _, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16, framework="numpy")
    k = arr(rng, (1, 17, 1, 16), framework="torch")
    with pytest.raises(TypeError, match=names("k")):
        nf.flash_attn_forward(q, k, v)


def test_non_array_input_raises_type_error_naming_it(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=names("q")):
        nf.flash_attn_forward(np.asarray(q).tolist() if SIMULATOR else [[1.0]], k, v)


@pytest.mark.parametrize("value", ["False", 1, None, np.int64(0)])
def test_causal_must_be_a_bool_not_merely_truthy(rng, qkv, value):
    q, k, v = qkv
    with pytest.raises(TypeError, match=names("causal")):
        nf.flash_attn_forward(q, k, v, causal=value)
    tq, tk, tv = make_qkv_arrays(rng, 1, 9, 9, 1, 16, framework="torch")
    with pytest.raises(TypeError, match=names("causal")):
        nf.flash_attn_func(tq, tk, tv, causal=value)
    with pytest.raises(TypeError, match=names("is_causal")):
        nf.scaled_dot_product_attention(tq, tk, tv, is_causal=value)
    with pytest.raises(TypeError, match=names("return_lse")):
        nf.flash_attn_func(tq, tk, tv, return_lse="yes")


def test_numpy_bool_causal_is_accepted(qkv):
    q, k, v = qkv
    a, _ = nf.flash_attn_forward(q, k, v, causal=np.bool_(True))
    b, _ = nf.flash_attn_forward(q, k, v, causal=True)
    assert_bitwise_equal(a, b, "out")


def test_bad_causal_align_raises_value_error_naming_it(qkv):
    with pytest.raises(ValueError, match="causal_align"):
        nf.flash_attn_forward(*qkv, causal=True, causal_align="center")


# --------------------------------------------------------------------------------------------------
# preallocated outputs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shape,dtype,exc", [
    ("out", (2, 17, 2, 32), "float32", ValueError),
    ("out", (2, 17, 2, 16), "float64", TypeError),
    ("lse", (2, 17, 2), "float32", ValueError),
    ("lse", (2, 2, 17), "float16", TypeError),
])
def test_preallocated_output_with_wrong_shape_or_dtype_raises_naming_it(qkv, name, shape, dtype, exc):
    with pytest.raises(exc, match=names(name)):
        nf.flash_attn_forward(*qkv, **{name: poison(shape, dtype)})


def test_non_contiguous_lse_raises_value_error_naming_it(qkv):
    lse = poison((2, 17, 2)).transpose(0, 2, 1) if DEFAULT_FW == "numpy" else poison((2, 17, 2)).transpose(1, 2)
    assert lse.shape == (2, 2, 17)
    with pytest.raises(ValueError, match=names("lse")):
        nf.flash_attn_forward(*qkv, lse=lse)


@pytest.mark.skipif(not SIMULATOR, reason="numpy inputs exist under the simulator only")
def test_preallocated_out_of_another_framework_raises_value_error_naming_it(qkv):
    with pytest.raises(ValueError, match=names("out")):
        nf.flash_attn_forward(*qkv, out=poison((2, 17, 2, 16), framework="torch"))


@pytest.mark.parametrize("name", ["dout", "out", "lse", "dq", "dk", "dv"])
def test_backward_argument_with_wrong_shape_raises_value_error_naming_it(rng, qkv, name):
    q, k, v = qkv
    args = dict(dout=arr(rng, (2, 17, 2, 16)), out=arr(rng, (2, 17, 2, 16)), lse=arr(rng, (2, 2, 17)))
    kw = {}
    wrong = (2, 5, 2, 16)
    if name in args:
        args[name] = arr(rng, wrong if name != "lse" else (2, 2, 5))
    else:
        kw[name] = poison(wrong)
    with pytest.raises(ValueError, match=names(name)):
        nf.flash_attn_backward(args["dout"], q, k, v, args["out"], args["lse"], **kw)


# --------------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,arg", [
    ({"attn_mask": "mask"}, "attn_mask"),
    ({"dropout_p": 0.1}, "dropout_p"),
    ({"enable_gqa": True}, "enable_gqa"),
])
def test_sdpa_unsupported_options_raise_value_error_naming_them(rng, kw, arg):
    q, k, v = (arr(rng, (1, 2, 17, 16), framework="torch") for _ in range(3))
    if arg == "attn_mask":
        kw = {"attn_mask": torch.ones(17, 17, dtype=torch.bool, device=q.device)}
    with pytest.raises(ValueError, match=arg):
        nf.scaled_dot_product_attention(q, k, v, **kw)


def test_sdpa_three_dimensional_input_raises_value_error_naming_it(rng):
    q, k, v = (arr(rng, (1, 2, 17, 16), framework="torch") for _ in range(3))
    with pytest.raises(ValueError, match=names("value")):
        nf.scaled_dot_product_attention(q, k, v[0])


# --------------------------------------------------------------------------------------------------
# block_mask
# --------------------------------------------------------------------------------------------------

def test_block_mask_of_wrong_type_raises_type_error_naming_it(qkv):
    with pytest.raises(TypeError, match="block_mask"):
        nf.flash_attn_forward(*qkv, block_mask=np.ones((2, 2), bool))


@pytest.mark.parametrize("path", ["flash_attn_forward", "flash_attn_func"])
@pytest.mark.parametrize("case", ["heads", "seqlen_q", "seqlen_k", "block_size"])
def test_invalid_block_mask_raises_value_error_naming_it(rng, case, path):
    b, _ = block_sizes(16)
    br, bc = mask_tile(16, "float32")
    fw = DEFAULT_FW if path == "flash_attn_forward" else "torch"
    q, k, v = make_qkv_arrays(rng, 1, 2 * b, 3 * b, 2, 16, framework=fw)
    nq, nk = 2 * b, 3 * b
    bm = {"heads": lambda: BlockMask.dense(nq, nk, b, nheads=3),
          "seqlen_q": lambda: BlockMask.dense(nq + 1, nk, b),
          "seqlen_k": lambda: BlockMask.dense(nq, nk - 1, b),
          "block_size": lambda: BlockMask.dense(nq, nk, (br, bc // 2))}[case]()
    with pytest.raises(ValueError, match="block_mask") as e:
        getattr(nf, path)(q, k, v, block_mask=bm)
    assert {"heads": "heads", "seqlen_q": "seqlen_q", "seqlen_k": "seqlen_k",
            "block_size": "block size"}[case] in str(e.value)


# --------------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not SIMULATOR, reason="the simulator is the one place host arrays are accepted")
def test_simulator_accepts_numpy_arrays(rng):
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16, framework="numpy")
    out, lse = nf.flash_attn_forward(q, k, v)
    assert isinstance(out, np.ndarray) and out.shape == q.shape and lse.shape == (1, 1, 17)


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_gpu_run_rejects_host_arrays_naming_them(rng, framework):
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16, framework="torch")
    host = np.asarray(k.cpu()) if framework == "numpy" else k.cpu()
    with pytest.raises((TypeError, ValueError), match=names("k")):
        nf.flash_attn_forward(q, host, v)


@pytest.mark.gpu
def test_gpu_arrays_on_different_devices_raise_value_error_naming_them(rng):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16, framework="torch")
    with pytest.raises(ValueError, match=names("v")):
        nf.flash_attn_forward(q, k, v.to("cuda:1"))


@pytest.mark.gpu
def test_gpu_preallocated_out_on_the_host_raises_value_error_naming_it(rng):
    q, k, v = make_qkv_arrays(rng, 1, 17, 17, 1, 16, framework="torch")
    with pytest.raises(ValueError, match=names("out")):
        nf.flash_attn_forward(q, k, v, out=torch.empty(q.shape, dtype=q.dtype))
