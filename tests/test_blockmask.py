"""BlockMask (numba_flash/blocksparse.py): host-side lists, patterns, composition, validation.

CPU only, no kernels. Every pattern is compared against a brute-force definition written with
Python loops over blocks or elements.
"""

import itertools

import numpy as np
import pytest

from numba_flash.blocksparse import BlockMask

# (seqlen_q, seqlen_k, block_size): square, non-multiples of the block size, seqlen_q != seqlen_k
# both ways, non-square blocks.
SIZES = [
    (256, 256, (64, 64)),
    (300, 500, (64, 128)),
    (500, 300, (128, 64)),
    (97, 33, (16, 16)),
    (33, 97, (32, 16)),
    (1, 200, (64, 64)),
]


def cdiv(a, b):
    return -(-a // b)


def blocks_touched(elem_mask, bq, bk):
    """Brute force: a block is kept iff any element of it is True."""
    sq, sk = elem_mask.shape
    tq, tk = cdiv(sq, bq), cdiv(sk, bk)
    out = np.zeros((tq, tk), bool)
    for i in range(tq):
        for j in range(tk):
            out[i, j] = elem_mask[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()
    return out


def elem_mask(sq, sk, visible):
    return np.array([[visible(r, c) for c in range(sk)] for r in range(sq)], dtype=bool)


def assert_lists_match_layout(m):
    """kv_* and q_* lists, rebuilt by hand from the layout, per the contract."""
    hm, tq, tk = m.shape
    for arr in (m.kv_count, m.kv_index, m.q_count, m.q_index):
        assert arr.dtype == np.int32 and arr.flags.c_contiguous and not arr.flags.writeable
    assert m.kv_count.shape == (hm, tq) and m.q_count.shape == (hm, tk)
    assert m.kv_index.shape[:2] == (hm, tq) and m.kv_index.shape[2] >= 1
    assert m.q_index.shape[:2] == (hm, tk) and m.q_index.shape[2] >= 1
    for h in range(hm):
        for i in range(tq):
            cols = [j for j in range(tk) if m.layout[h, i, j]]
            n = m.kv_count[h, i]
            assert n == len(cols)
            assert list(m.kv_index[h, i, :n]) == cols
            assert not m.kv_index[h, i, n:].any()
        for j in range(tk):
            rows = [i for i in range(tq) if m.layout[h, i, j]]
            n = m.q_count[h, j]
            assert n == len(rows)
            assert list(m.q_index[h, j, :n]) == rows
            assert not m.q_index[h, j, n:].any()


# --- from_layout, lists, to_dense ---------------------------------------------------------------

@pytest.mark.parametrize("sq,sk,bs", SIZES)
def test_from_layout_lists_and_transpose_lists_match_the_layout(sq, sk, bs):
    rng = np.random.default_rng(1)
    tq, tk = cdiv(sq, bs[0]), cdiv(sk, bs[1])
    layout = rng.random((3, tq, tk)) < 0.4
    m = BlockMask.from_layout(layout, bs, sq, sk)
    assert m.shape == (3, tq, tk)
    np.testing.assert_array_equal(m.layout, layout)
    assert_lists_match_layout(m)


@pytest.mark.parametrize("sq,sk,bs", SIZES)
def test_to_dense_expands_each_block_and_crops_to_the_seqlens(sq, sk, bs):
    rng = np.random.default_rng(2)
    bq, bk = bs
    layout = rng.random((2, cdiv(sq, bq), cdiv(sk, bk))) < 0.5
    dense = BlockMask.from_layout(layout, bs, sq, sk).to_dense()
    assert dense.shape == (2, sq, sk) and dense.dtype == bool
    for h, r, c in itertools.product(range(2), range(sq), range(sk)):
        assert dense[h, r, c] == layout[h, r // bq, c // bk]
    # round trip: the dense mask's touched blocks are the layout (every block has >= 1 element)
    for h in range(2):
        np.testing.assert_array_equal(blocks_touched(dense[h], bq, bk), layout[h])


def test_to_dense_accepts_shorter_seqlens_and_rejects_longer_ones():
    m = BlockMask.dense(100, 100, 64)
    assert m.to_dense(70, 90).shape == (1, 70, 90)
    with pytest.raises(ValueError, match="seqlen_q"):
        m.to_dense(129, 100)
    with pytest.raises(ValueError, match="seqlen_k"):
        m.to_dense(100, 129)


def test_from_layout_defaults_seqlens_to_whole_blocks_and_accepts_2d_int_layout_and_int_block():
    m = BlockMask.from_layout(np.array([[1, 0], [1, 1]]), block_size=32)
    assert (m.seqlen_q, m.seqlen_k, m.block_size, m.shape) == (64, 64, (32, 32), (1, 2, 2))
    assert m.layout.dtype == bool and m.nnz == 3


def test_from_layout_copies_the_input_and_arrays_are_read_only():
    layout = np.ones((2, 2), bool)
    m = BlockMask.from_layout(layout, 16)
    layout[0, 0] = False
    assert m.layout[0, 0, 0]
    for name in ("layout", "kv_count", "kv_index", "q_count", "q_index"):
        with pytest.raises(ValueError):
            getattr(m, name)[...] = 0
    assert m._device_cache == {}


def test_empty_mask_lists_are_one_wide_and_all_zero():
    m = BlockMask.from_layout(np.zeros((2, 3, 4), bool), 16)
    assert m.kv_index.shape == (2, 3, 1) and m.q_index.shape == (2, 4, 1)
    assert m.nnz == 0 and m.density == 0.0
    assert not m.kv_count.any() and not m.q_count.any()


# --- patterns against brute force ---------------------------------------------------------------

@pytest.mark.parametrize("sq,sk,bs", SIZES)
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_causal_keeps_exactly_blocks_with_a_causally_visible_element(sq, sk, bs, align):
    off = sk - sq if align == "bottom_right" else 0
    want = blocks_touched(elem_mask(sq, sk, lambda r, c: c <= r + off), *bs)
    m = BlockMask.causal(sq, sk, bs, align=align)
    np.testing.assert_array_equal(m.layout[0], want)
    assert_lists_match_layout(m)


@pytest.mark.parametrize("sq,sk,bs", SIZES)
@pytest.mark.parametrize("window", [0, 5, 40, 1000])
@pytest.mark.parametrize("causal", [False, True])
def test_local_keeps_exactly_blocks_intersecting_the_band(sq, sk, bs, window, causal):
    off = sk - sq
    lo = 0 if causal else -window
    want = blocks_touched(elem_mask(sq, sk, lambda r, c: lo <= r + off - c <= window), *bs)
    m = BlockMask.local(window, sq, sk, bs, causal=causal)
    np.testing.assert_array_equal(m.layout[0], want)


def test_local_top_left_alignment_uses_zero_offset():
    sq, sk, bs = (50, 120, (16, 16))
    want = blocks_touched(elem_mask(sq, sk, lambda r, c: abs(r - c) <= 7), *bs)
    np.testing.assert_array_equal(BlockMask.local(7, sq, sk, bs, align="top_left").layout[0], want)


@pytest.mark.parametrize("sq,sk,bs", SIZES)
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_strided_is_local_groups_plus_summary_columns(sq, sk, bs, stride, causal):
    tq, tk = cdiv(sq, bs[0]), cdiv(sk, bs[1])
    want = np.zeros((tq, tk), bool)
    for i in range(tq):
        for j in range(tk):
            want[i, j] = i // stride == j // stride or j % stride == stride - 1
    if causal:
        want &= BlockMask.causal(sq, sk, bs).layout[0]
    m = BlockMask.strided(stride, sq, sk, bs, causal=causal)
    np.testing.assert_array_equal(m.layout[0], want)


def test_strided_causal_with_square_blocks_keeps_only_the_lower_triangle():
    m = BlockMask.strided(4, 512, 512, 32, causal=True)
    assert not np.triu(m.layout[0], 1).any()
    assert np.diag(m.layout[0]).all()


@pytest.mark.parametrize("tq,tk", [(1, 1), (4, 4), (8, 8), (5, 5), (3, 7), (6, 2), (16, 16)])
def test_butterfly_is_the_union_of_butterfly_factor_supports(tq, tk):
    t = 1
    while t < max(tq, tk):
        t *= 2
    want = np.eye(t, dtype=bool)
    for s in range(t.bit_length() - 1):
        for i in range(t):
            want[i, i ^ (1 << s)] = True
    m = BlockMask.butterfly(tq * 16 - 3 if tq > 1 else 16, tk * 16, 16)
    assert m.shape == (1, tq, tk)
    np.testing.assert_array_equal(m.layout[0], want[:tq, :tk])


def test_butterfly_square_power_of_two_has_one_plus_log2_blocks_per_row():
    m = BlockMask.butterfly(1024, 1024, 64)
    assert (m.kv_count == 1 + 4).all() and (m.q_count == 5).all()


def test_random_matches_default_rng_draw_plus_forced_diagonal_per_head():
    sq, sk, bs, density, seed = 700, 300, (64, 32), 0.3, 7
    tq, tk = cdiv(sq, bs[0]), cdiv(sk, bs[1])
    m = BlockMask.random(density, sq, sk, bs, nheads=3, seed=seed)
    want = np.random.default_rng(seed).random((3, tq, tk)) < density
    for i in range(tq):
        want[:, i, min(i * tk // tq, tk - 1)] = True
    np.testing.assert_array_equal(m.layout, want)
    assert (m.kv_count >= 1).all()
    assert not (m.layout[0] == m.layout[1]).all()  # heads differ


def test_random_is_reproducible_and_density_zero_and_one_are_empty_and_full():
    a = BlockMask.random(0.5, 512, 512, 32, seed=3)
    b = BlockMask.random(0.5, 512, 512, 32, seed=3)
    np.testing.assert_array_equal(a.layout, b.layout)
    assert BlockMask.random(0.0, 512, 512, 32).nnz == 0
    assert BlockMask.random(1.0, 512, 512, 32).density == 1.0


def test_random_density_is_close_to_the_requested_probability():
    m = BlockMask.random(0.25, 4096, 4096, 32, seed=0)
    assert abs(m.density - 0.25) < 0.03


def test_dense_keeps_every_block_for_every_head():
    m = BlockMask.dense(300, 500, (64, 128), nheads=4)
    assert m.shape == (4, 5, 4) and m.layout.all() and m.density == 1.0 and m.nnz == 80
    assert (m.kv_count == 4).all() and (m.q_count == 5).all()


def test_pattern_nheads_replicates_the_layout_per_head():
    one = BlockMask.causal(300, 300, 64)
    four = BlockMask.causal(300, 300, 64, nheads=4)
    assert four.shape == (4,) + one.shape[1:]
    for h in range(4):
        np.testing.assert_array_equal(four.layout[h], one.layout[0])


# --- from_predicate -------------------------------------------------------------------------------

def test_from_predicate_vectorised_call_gets_broadcast_index_arrays_once():
    calls = []

    def fn(h, i, j):
        calls.append((np.shape(h), np.shape(i), np.shape(j)))
        return (i + h) >= j

    m = BlockMask.from_predicate(fn, 3, 300, 200, (64, 32))
    assert calls == [((3, 1, 1), (1, 5, 1), (1, 1, 7))]
    want = np.array([[[i + h >= j for j in range(7)] for i in range(5)] for h in range(3)])
    np.testing.assert_array_equal(m.layout, want)


def test_from_predicate_falls_back_to_a_loop_when_fn_rejects_arrays():
    allowed = {(0, 1), (2, 2), (3, 0)}
    calls = []

    def fn(h, i, j):  # a set lookup raises TypeError (unhashable) on arrays
        calls.append((h, i, j))
        return (i, j) in allowed

    m = BlockMask.from_predicate(fn, None, 4 * 16, 3 * 16, 16)
    assert m.shape == (1, 4, 3)
    assert {(i, j) for i, j in zip(*np.nonzero(m.layout[0]))} == allowed
    assert all(isinstance(a, int) and h == 0 for h, *rest in calls[1:] for a in (h, *rest))


def test_from_predicate_falls_back_to_a_loop_when_vectorised_result_is_not_3d():
    # np.all reduces the arrays to a scalar: the vectorised result must not be trusted.
    m = BlockMask.from_predicate(lambda h, i, j: np.all(np.asarray(i) >= np.asarray(j)), 1, 64, 64, 16)
    np.testing.assert_array_equal(m.layout[0], np.tril(np.ones((4, 4), bool)))


def test_from_predicate_per_head_loop_path_sees_each_head():
    m = BlockMask.from_predicate(lambda h, i, j: int(h) == int(i) == int(j), 2, 32, 32, 16)
    np.testing.assert_array_equal(m.layout, [[[1, 0], [0, 0]], [[0, 0], [0, 1]]])


# --- composition, density, picture ----------------------------------------------------------------

def test_union_and_intersection_are_elementwise_or_and_with_head_broadcast():
    c = BlockMask.causal(500, 300, (64, 32))
    r = BlockMask.random(0.3, 500, 300, (64, 32), nheads=3, seed=5)
    u, n = c | r, c & r
    assert u.shape == n.shape == (3,) + c.shape[1:]
    np.testing.assert_array_equal(u.layout, c.layout | r.layout)
    np.testing.assert_array_equal(n.layout, c.layout & r.layout)
    np.testing.assert_array_equal(c.union(r).layout, u.layout)
    np.testing.assert_array_equal(r.intersection(c).layout, n.layout)
    assert_lists_match_layout(u)
    assert_lists_match_layout(n)


def test_composition_rejects_mismatched_block_size_seqlens_and_heads():
    a = BlockMask.causal(256, 256, 64)
    with pytest.raises(ValueError, match="block size"):
        a | BlockMask.causal(256, 256, 32)
    with pytest.raises(ValueError, match="seqlen"):
        a & BlockMask.causal(250, 256, 64)
    with pytest.raises(ValueError, match="heads"):
        BlockMask.dense(256, 256, 64, nheads=2) | BlockMask.dense(256, 256, 64, nheads=3)
    with pytest.raises(TypeError):
        a | np.ones((1, 4, 4), bool)


def test_density_nnz_and_shape_count_blocks_over_heads():
    layout = np.zeros((2, 4, 5), bool)
    layout[0, 0, :3] = True
    layout[1, 3, 4] = True
    m = BlockMask.from_layout(layout, 8)
    assert m.shape == (2, 4, 5) and m.nnz == 4
    assert isinstance(m.density, float) and m.density == pytest.approx(4 / 40)


def test_picture_has_header_and_one_hash_dot_row_per_query_block_per_head():
    layout = np.array([[[1, 0, 1], [0, 1, 0]], [[1, 1, 1], [0, 0, 0]]], bool)
    text = str(BlockMask.from_layout(layout, (16, 32), 30, 90))
    lines = text.splitlines()
    assert lines[0] == "BlockMask(heads=2, seqlen_q=30, seqlen_k=90, block=(16, 32), density=0.50)"
    assert lines[1:] == ["head 0:", "  #.#", "  .#.", "head 1:", "  ###", "  ..."]
    assert repr(BlockMask.from_layout(layout, (16, 32), 30, 90)) == text


def test_picture_truncates_rows_columns_and_heads_with_a_note():
    m = BlockMask.dense(100 * 16, 100 * 16, 16, nheads=6)
    text = m.to_string(max_rows=4, max_cols=10, max_heads=2)
    lines = text.splitlines()
    assert "  ########## ... (+90 key blocks)" in lines
    assert "  ... (+96 query blocks)" in lines
    assert lines[-1] == "... (+4 heads)"
    assert "head 2:" not in text


def test_picture_labels_a_shared_mask():
    assert "shared by all heads" in str(BlockMask.causal(64, 64, 32))


# --- check (dispatcher validation) ------------------------------------------------------------------

def test_check_returns_tiles_per_block():
    assert BlockMask.causal(512, 256, (128, 64)).check(8, 512, 256, (64, 32)) == (2, 2)
    assert BlockMask.causal(512, 256, (128, 64), nheads=8).check(8, 512, 256, tile=(128, 64)) == (1, 1)


def test_check_rejects_head_count_seqlens_and_tile_not_dividing_the_block():
    m = BlockMask.dense(256, 256, (100, 128), nheads=4)
    with pytest.raises(ValueError, match=r"block_mask has 4 heads, attention has 8"):
        m.check(8, 256, 256, (50, 64))
    with pytest.raises(ValueError, match=r"block_mask was built for seqlen_q=256, got 255"):
        m.check(4, 255, 256, (50, 64))
    with pytest.raises(ValueError, match=r"block_mask was built for seqlen_k=256, got 512"):
        m.check(4, 256, 512, (50, 64))
    with pytest.raises(ValueError, match=r"block_mask block size \(100, 128\) is not a multiple of "
                                         r"the kernel tile \(64, 64\)"):
        m.check(4, 256, 256, (64, 64))
    with pytest.raises(ValueError, match="tile"):
        m.check(4, 256, 256, (0, 64))


# --- every constructor error names its argument -----------------------------------------------------

@pytest.mark.parametrize("call,exc,name", [
    (lambda: BlockMask.from_layout(np.ones(4, bool)), ValueError, "layout must have shape"),
    (lambda: BlockMask.from_layout(np.ones((1, 1, 2, 2), bool)), ValueError, "layout must have shape"),
    (lambda: BlockMask.from_layout(np.ones((0, 2), bool)), ValueError, "layout must have shape"),
    (lambda: BlockMask.from_layout(np.array([["a"]])), TypeError, "layout must be bool-like"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), block_size=0), ValueError, "block_size"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), block_size=(64, -1)), ValueError, "block_size"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), block_size=(64, 64, 64)), ValueError, "block_size"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), block_size=64.0), TypeError, "block_size"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), block_size=(64, True)), TypeError, "block_size"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), block_size="64"), TypeError, "block_size"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), 64, seqlen_q=129), ValueError, "seqlen_q"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), 64, seqlen_k=64), ValueError, "seqlen_k"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), 64, seqlen_q=0), ValueError, "seqlen_q"),
    (lambda: BlockMask.from_layout(np.ones((2, 2)), 64, seqlen_k=1.5), TypeError, "seqlen_k"),
    (lambda: BlockMask.causal(64, 64, 32, align="left"), ValueError, "align"),
    (lambda: BlockMask.causal(64, 64, 32, nheads=0), ValueError, "nheads"),
    (lambda: BlockMask.local(-1, 64, 64, 32), ValueError, "window"),
    (lambda: BlockMask.local(2.5, 64, 64, 32), TypeError, "window"),
    (lambda: BlockMask.strided(0, 64, 64, 32), ValueError, "stride"),
    (lambda: BlockMask.random(1.5, 64, 64, 32), ValueError, "density"),
    (lambda: BlockMask.random("0.5", 64, 64, 32), TypeError, "density"),
    (lambda: BlockMask.from_predicate(lambda h, i, j: True, 1, -4, 64, 32), ValueError, "seqlen_q"),
    (lambda: BlockMask.dense(64, 64, 32).check(0, 64, 64, (32, 32)), ValueError, "nheads"),
])
def test_invalid_arguments_raise_with_the_argument_named(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


# --- from_flex ----------------------------------------------------------------------------------------

@pytest.fixture
def flex():
    pytest.importorskip("torch")
    return pytest.importorskip("torch.nn.attention.flex_attention")


def flex_layout(fbm):
    """The flex mask's own block picture, (B, H, Tq, Tk) -> numpy bool."""
    return fbm.to_dense().cpu().numpy() != 0


@pytest.mark.parametrize("sq,sk,bs", [(256, 256, 64), (300, 500, (64, 128)), (500, 300, 128)])
def test_from_flex_causal_matches_create_block_mask_and_our_top_left_causal(flex, sq, sk, bs):
    fbm = flex.create_block_mask(lambda b, h, q, kv: q >= kv, 1, 2, sq, sk, device="cpu",
                                 BLOCK_SIZE=bs)
    m = BlockMask.from_flex(fbm)
    assert (m.seqlen_q, m.seqlen_k) == (sq, sk) and m.shape[0] == 2
    np.testing.assert_array_equal(m.layout, flex_layout(fbm)[0])
    # flex's causal mask_mod q >= kv is top-left aligned
    np.testing.assert_array_equal(m.layout[0], BlockMask.causal(sq, sk, bs, align="top_left").layout[0])
    assert_lists_match_layout(m)


@pytest.mark.parametrize("window", [0, 50, 200])
def test_from_flex_sliding_window_matches_create_block_mask_and_our_local(flex, window):
    sq, sk, bs = 400, 700, (64, 128)
    fbm = flex.create_block_mask(lambda b, h, q, kv: (q - kv <= window) & (kv - q <= window),
                                 None, None, sq, sk, device="cpu", BLOCK_SIZE=bs)
    m = BlockMask.from_flex(fbm, nheads=8)
    assert m.shape[0] == 1
    np.testing.assert_array_equal(m.layout, flex_layout(fbm)[0])
    np.testing.assert_array_equal(m.layout, BlockMask.local(window, sq, sk, bs, align="top_left").layout)


def test_from_flex_from_kv_blocks_without_full_blocks(flex):
    import torch
    kv_num = torch.tensor([[[1, 2]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[1, 0, 0], [2, 0, 7]]]], dtype=torch.int32)  # 7: garbage past the count
    fbm = flex.BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(64, 32))
    m = BlockMask.from_flex(fbm)
    np.testing.assert_array_equal(m.layout[0], [[0, 1, 0], [1, 0, 1]])
    assert m.block_size == (64, 32)


def test_from_flex_accepts_identical_batch_entries_and_rejects_differing_ones(flex):
    same = flex.create_block_mask(lambda b, h, q, kv: q >= kv, 3, 1, 256, 256, device="cpu",
                                  BLOCK_SIZE=64)
    assert BlockMask.from_flex(same).shape == (1, 4, 4)
    differ = flex.create_block_mask(lambda b, h, q, kv: (q >= kv) | (b == 1), 2, 1, 256, 256,
                                    device="cpu", BLOCK_SIZE=64)
    with pytest.raises(ValueError, match="batch"):
        BlockMask.from_flex(differ)


def test_from_flex_rejects_wrong_head_count_and_non_flex_objects(flex):
    fbm = flex.create_block_mask(lambda b, h, q, kv: q >= kv, 1, 4, 128, 128, device="cpu",
                                 BLOCK_SIZE=64)
    assert BlockMask.from_flex(fbm, nheads=4).shape[0] == 4
    with pytest.raises(ValueError, match="heads"):
        BlockMask.from_flex(fbm, nheads=8)
    with pytest.raises(TypeError, match="flex_block_mask"):
        BlockMask.from_flex(BlockMask.causal(128, 128, 64))
