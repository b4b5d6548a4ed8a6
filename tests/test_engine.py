"""The codebook engine against small pure-numpy implementations of the same steps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gsrq
from gsrq import InvalidValueError, ShapeError

# ---------------------------------------------------------------- numpy oracles


def _sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x[:, None, :].astype(np.float64) - c[None, :, :].astype(np.float64)) ** 2).sum(-1)


def np_lloyd(x, w, c0, iters):
    """Weighted Lloyd in float64; empty clusters re-seeded at the samples with the largest w·d²."""
    x64 = x.astype(np.float64)
    w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
    c = c0.astype(np.float64).copy()
    k = len(c)
    history = []
    for _ in range(iters):
        d2 = _sqdist(x64, c)
        labels = d2.argmin(1)
        dmin = d2[np.arange(len(x)), labels]
        history.append(float((w * dmin).sum()))
        wsum = np.bincount(labels, weights=w, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, labels, w[:, None] * x64)
        empty = np.flatnonzero(wsum <= 0)
        nonempty = wsum > 0
        c[nonempty] = sums[nonempty] / wsum[nonempty, None]
        if len(empty):
            order = sorted(range(len(x)), key=lambda i: (-(w[i] * dmin[i]), i))
            for kk, i in zip(empty, order):
                c[kk] = x64[i]
    d2 = _sqdist(x64, c)
    labels = d2.argmin(1)
    history.append(float((w * d2[np.arange(len(x)), labels]).sum()))
    return c, labels, np.array(history)


def bf16(a):
    """Round float32 values to bfloat16 (nearest even), returned as float32."""
    b = np.asarray(a, np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32).reshape(np.shape(a))


def np_gskm(x, w, c0, init_iters, iters, weights_in_init_only=False):
    """DESIGN.md §1 step by step, in float64 (gains rounded to bf16 via float32)."""
    x64 = x.astype(np.float64)
    n = len(x)
    wv = np.ones(n) if w is None else np.asarray(w, np.float64)
    norms = np.sqrt((x64**2).sum(1))
    u = np.where(norms[:, None] > 0, x64 / np.where(norms > 0, norms, 1)[:, None], 0.0).astype(np.float32)
    c, labels, _ = np_lloyd(u, w, c0, init_iters)
    k = len(c)
    cn = np.sqrt((c**2).sum(1))
    shapes = np.where(cn[:, None] > 0, c / np.where(cn > 0, cn, 1)[:, None], 0.0)
    wsum = np.bincount(labels, weights=wv, minlength=k)
    gsum = np.bincount(labels, weights=wv * norms, minlength=k)
    mean_norm = (wv * norms).sum() / wv.sum()
    gains = np.where(wsum > 0, gsum / np.where(wsum > 0, wsum, 1), mean_norm)
    wa = np.ones(n) if weights_in_init_only else wv
    for _ in range(iters):
        g = np.maximum(bf16(gains.astype(np.float32)).astype(np.float64), 1e-4)
        score = 2 * g[None, :] * (x64 @ shapes.T) - g[None, :] ** 2
        labels = score.argmax(1)
        ws = np.bincount(labels, weights=wa, minlength=k)
        sums = np.zeros((k, x.shape[1]))
        np.add.at(sums, labels, wa[:, None] * x64)
        for kk in range(k):
            if ws[kk] <= 0:
                continue
            gains[kk] = max((sums[kk] @ shapes[kk]) / ws[kk], 1e-4)
            nn = np.linalg.norm(sums[kk])
            if nn > 0:
                shapes[kk] = sums[kk] / nn
    codebook = gains[:, None] * shapes
    labels = _sqdist(x64, codebook).argmin(1)
    return codebook, labels


def np_rq_greedy(x, cbs):
    r = x.astype(np.float64).copy()
    codes = []
    for cb in cbs:
        lab = _sqdist(r, cb).argmin(1)
        codes.append(lab)
        r -= cb[lab]
    return np.stack(codes, 1)


def blobs(n, d, centers, seed, spread=0.3):
    rng = np.random.default_rng(seed)
    cs = rng.standard_normal((centers, d)) * 3
    return (cs[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("n", "d", "k"), [(400, 3, 6), (700, 16, 20), (300, 40, 33)])
def test_kmeans_matches_numpy_lloyd(n, d, k, weighted):
    x = blobs(n, d, k + 3, seed=n + d)
    rng = np.random.default_rng(1)
    w = rng.uniform(0.1, 3.0, n).astype(np.float32) if weighted else None
    c0 = x[rng.choice(n, k, replace=False)].copy()
    c, labels, hist = gsrq.kmeans(x, k, weights=w, iters=8, init_centroids=c0, return_history=True)
    rc, rl, rh = np_lloyd(x, w, c0, 8)
    assert c.dtype == np.float32 and c.shape == (k, d)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(c, rc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hist, rh, rtol=1e-4)


def test_kmeans_empty_cluster_reseeding_matches_numpy():
    x = blobs(300, 4, 5, seed=3)
    c0 = np.full((4, 4), 50.0, np.float32)  # all identical and far away: three start empty
    c0[0] = x[0]
    c, labels, hist = gsrq.kmeans(x, 4, iters=6, init_centroids=c0, return_history=True)
    rc, rl, _ = np_lloyd(x, None, c0, 6)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(c, rc, rtol=1e-5, atol=1e-5)
    assert len(np.unique(labels)) == 4


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_objective_never_increases(init):
    x = np.random.default_rng(5).standard_normal((3000, 8)).astype(np.float32)
    _, labels, hist = gsrq.kmeans(x, 50, iters=15, init=init, seed=3, return_history=True)
    assert hist.shape == (16,)
    assert np.all(np.diff(hist) <= 1e-6 * hist[:-1])
    assert hist[-1] < 0.9 * hist[0]
    # The last entry is the objective of the returned centroids and labels.
    c, _ = gsrq.kmeans(x, 50, iters=15, init=init, seed=3)
    direct = ((x.astype(np.float64) - c[labels]) ** 2).sum()
    assert hist[-1] == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_init_draws_distinct_positive_weight_samples(init):
    x = np.random.default_rng(0).standard_normal((200, 5)).astype(np.float32)
    w = np.zeros(200, np.float32)
    w[::10] = 1.0  # 20 samples of positive weight
    c, _ = gsrq.kmeans(x, 20, weights=w, iters=0, init=init, seed=7)
    idx = [int(np.flatnonzero((x == row).all(1))[0]) for row in c]
    assert sorted(idx) == list(range(0, 200, 10))
    with pytest.raises(InvalidValueError, match="positive weight"):
        gsrq.kmeans(x, 21, weights=w, iters=0, init=init)


def test_kmeans_seed_changes_and_fixes_result():
    x = np.random.default_rng(2).standard_normal((1000, 6)).astype(np.float32)
    a, _ = gsrq.kmeans(x, 16, iters=3, seed=1)
    b, _ = gsrq.kmeans(x, 16, iters=3, seed=1)
    c, _ = gsrq.kmeans(x, 16, iters=3, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_kmeans_plusplus_beats_random_on_blobs():
    x = blobs(2000, 2, 30, seed=11, spread=0.05)
    worse = 0
    for s in range(5):
        _, _, hp = gsrq.kmeans(x, 30, iters=0, init="kmeans++", seed=s, return_history=True)
        _, _, hr = gsrq.kmeans(x, 30, iters=0, init="random", seed=s, return_history=True)
        worse += hp[-1] > hr[-1]
    assert worse <= 1


# ---------------------------------------------------------------- weights


def test_duplicating_a_sample_equals_weight_two():
    rng = np.random.default_rng(4)
    x = blobs(300, 5, 8, seed=4)
    dup = rng.choice(300, 60, replace=False)
    x2 = np.concatenate([x, x[dup]])
    w = np.ones(300, np.float32)
    w[dup] = 2.0
    c0 = x[rng.choice(300, 10, replace=False)]
    ca, la = gsrq.kmeans(x, 10, weights=w, iters=10, init_centroids=c0)
    cb, lb = gsrq.kmeans(x2, 10, iters=10, init_centroids=c0)
    np.testing.assert_allclose(ca, cb, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(la, lb[:300])
    ga, gla = gsrq.gskm(x, 10, weights=w, init_centroids=c0 / np.linalg.norm(c0, axis=1, keepdims=True))
    gb, glb = gsrq.gskm(x2, 10, init_centroids=c0 / np.linalg.norm(c0, axis=1, keepdims=True))
    np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gla, glb[:300])


def test_weights_pull_centroid():
    x = np.array([[0.0], [1.0], [10.0]], np.float32)
    c, _ = gsrq.kmeans(x, 1, weights=np.array([3.0, 1.0, 0.0], np.float32), iters=1, init="random")
    assert c[0, 0] == pytest.approx(0.25)


# ---------------------------------------------------------------- GSKM


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("init_only", [False, True])
@pytest.mark.parametrize(("n", "d", "k"), [(500, 4, 8), (600, 24, 16)])
def test_gskm_matches_numpy(n, d, k, weighted, init_only):
    rng = np.random.default_rng(n + d + k)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0, (n, 1))).astype(np.float32)
    w = rng.uniform(0.1, 2.0, n).astype(np.float32) if weighted else None
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    c0 = u[rng.choice(n, k, replace=False)].copy()
    cb, labels, hist = gsrq.gskm(
        x, k, weights=w, init_iters=6, iters=5, init_centroids=c0,
        weights_in_init_only=init_only, return_history=True,
    )
    rcb, rl = np_gskm(x, w, c0, 6, 5, weights_in_init_only=init_only)
    assert cb.dtype == np.float32 and cb.shape == (k, d)
    assert hist.shape == (6,)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(cb, rcb, rtol=1e-4, atol=1e-5)


def test_gskm_zero_vectors():
    # A zero vector stays zero on the sphere (it is equidistant from every unit centroid,
    # so its spherical cluster is arbitrary); it must never produce NaN.
    rng = np.random.default_rng(10)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    x[::5] = 0.0
    cb, labels = gsrq.gskm(x, 12, init_iters=5, iters=5)
    assert np.isfinite(cb).all()
    assert np.all(np.linalg.norm(cb, axis=1) >= 1e-4 * (1 - 1e-6))
    # Zero rows are nearest to the shortest codeword.
    assert np.all(labels[::5] == np.linalg.norm(cb, axis=1).argmin())
    # All-zero data: every gain is clamped to 1e-4 on a zero shape -> zero codewords.
    cbz, _ = gsrq.gskm(np.zeros((20, 3), np.float32), 2, init_iters=2, iters=2)
    assert np.isfinite(cbz).all() and np.abs(cbz).max() <= 1e-4


def test_gskm_codewords_are_gain_times_unit_shape():
    x = np.random.default_rng(8).standard_normal((2000, 32)).astype(np.float32)
    cb, labels = gsrq.gskm(x, 16, seed=1)
    gains = np.linalg.norm(cb, axis=1)
    assert np.all(gains >= 1e-4 * (1 - 1e-6))
    # Gain = weighted mean projection of the members on the shape used to assign; at a
    # fixed point of the alternation the members' mean projection on the final shape
    # is close to the gain.
    for kk in range(16):
        m = x[labels == kk]
        if len(m) > 20:
            proj = (m @ (cb[kk] / gains[kk])).mean()
            assert proj == pytest.approx(gains[kk], rel=0.1)


def test_gskm_initial_gains_keep_the_members_scale():
    # Centroid shrinkage: at D=64 with few clusters, k-means centroids are much shorter
    # than the data. GSKM's initial gains are the members' mean norm (~sqrt(64) here).
    x = np.random.default_rng(9).standard_normal((3000, 64)).astype(np.float32)
    ck, _ = gsrq.kmeans(x, 32, iters=20)
    cg, _ = gsrq.gskm(x, 32, iters=0)
    norms = np.linalg.norm(x, axis=1)
    assert np.linalg.norm(cg, axis=1) == pytest.approx(np.full(32, norms.mean()), rel=0.05)
    assert np.linalg.norm(ck, axis=1).mean() < 0.5 * norms.mean()


# ---------------------------------------------------------------- determinism


def test_bitwise_identical_across_thread_counts():
    x = np.random.default_rng(6).standard_normal((5000, 12)).astype(np.float32)
    w = np.random.default_rng(7).uniform(0, 2, 5000).astype(np.float32)
    r1 = gsrq.kmeans(x, 40, weights=w, iters=4, threads=1, return_history=True)
    r2 = gsrq.kmeans(x, 40, weights=w, iters=4, threads=2, return_history=True)
    for a, b in zip(r1, r2):
        assert a.tobytes() == b.tobytes()
    r0 = gsrq.kmeans(x, 40, weights=w, iters=4, threads=None, return_history=True)  # global pool
    for a, b in zip(r0, r2):
        assert a.tobytes() == b.tobytes()
    g1 = gsrq.gskm(x, 40, weights=w, init_iters=3, iters=3, threads=1)
    g2 = gsrq.gskm(x, 40, weights=w, init_iters=3, iters=3, threads=2)
    for a, b in zip(g1, g2):
        assert a.tobytes() == b.tobytes()
    q1 = gsrq.ResidualQuantizer(12, 32, 2, threads=1, init_iters=3, iters=3).fit(x, w)
    q2 = gsrq.ResidualQuantizer(12, 32, 2, threads=2, init_iters=3, iters=3).fit(x, w)
    assert q1.codebooks.tobytes() == q2.codebooks.tobytes()
    assert q1.encode(x).tobytes() == q2.encode(x).tobytes()
    assert q1.encode(x, beam=3).tobytes() == q2.encode(x, beam=3).tobytes()


# ---------------------------------------------------------------- residual quantizer


@pytest.mark.parametrize("method", ["gskm", "km"])
def test_rq_reconstructs_representable_data_exactly(method):
    rng = np.random.default_rng(12)
    d, kc = 6, 8
    c1 = rng.standard_normal((kc, d)) * 50
    c2 = rng.standard_normal((kc, d))
    a, b = np.meshgrid(np.arange(kc), np.arange(kc), indexing="ij")
    a, b = np.tile(a.ravel(), 10), np.tile(b.ravel(), 10)
    x = (c1[a] + c2[b]).astype(np.float32)
    rq = gsrq.ResidualQuantizer(d, kc, 2, method, iters=20).fit(x)
    codes = rq.encode(x)
    assert codes.dtype == np.uint16 and codes.shape == (len(x), 2)
    np.testing.assert_allclose(rq.decode(codes), x, atol=1e-3)
    assert rq.codebooks.shape == (2, kc, d) and rq.codebooks.dtype == np.float32
    assert rq.bits_per_element == pytest.approx(2 * 3 / 6)


def test_rq_greedy_encode_and_decode_match_numpy():
    rng = np.random.default_rng(13)
    cbs = rng.standard_normal((3, 16, 5)).astype(np.float32)
    x = rng.standard_normal((400, 5)).astype(np.float32)
    rq = gsrq.ResidualQuantizer.from_codebooks(cbs)
    codes = rq.encode(x)
    np.testing.assert_array_equal(codes, np_rq_greedy(x, cbs))
    xh = rq.decode(codes)
    ref = sum(cbs[m][codes[:, m].astype(np.int64)] for m in range(3))
    np.testing.assert_allclose(xh, ref, rtol=1e-6, atol=1e-6)


def test_rq_greedy_ties_go_to_lowest_index():
    cbs = np.zeros((1, 4, 2), np.float32)
    cbs[0, 1] = cbs[0, 3] = [1.0, 1.0]
    cbs[0, 0] = [-5, -5]
    cbs[0, 2] = [9, 9]
    rq = gsrq.ResidualQuantizer.from_codebooks(cbs)
    assert rq.encode(np.array([[1.0, 1.2]], np.float32))[0, 0] == 1


def test_rq_beam_full_width_is_exhaustive_search():
    rng = np.random.default_rng(14)
    cbs = rng.standard_normal((2, 8, 4)).astype(np.float32)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    rq = gsrq.ResidualQuantizer.from_codebooks(cbs)
    best = np.array([
        min(itertools.product(range(8), range(8)),
            key=lambda ab: (((xi - cbs[0, ab[0]] - cbs[1, ab[1]]).astype(np.float64)) ** 2).sum())
        for xi in x
    ])
    codes = rq.encode(x, beam=8)
    err = lambda c: ((x - rq.decode(c)).astype(np.float64) ** 2).sum(1)  # noqa: E731
    np.testing.assert_allclose(err(codes), err(best), rtol=1e-5, atol=1e-6)
    assert err(rq.encode(x)).sum() > err(codes).sum()
    np.testing.assert_array_equal(rq.encode(x, beam=1), rq.encode(x))
    empty = rq.encode(np.zeros((0, 4), np.float32))
    assert empty.shape == (0, 2) and empty.dtype == np.uint16
    assert rq.decode(empty).shape == (0, 4)


def test_rq_stage_two_is_trained_on_residuals():
    x = np.random.default_rng(15).standard_normal((3000, 8)).astype(np.float32)
    rq = gsrq.ResidualQuantizer(8, 16, 2, "km", iters=10).fit(x)
    c1, l1 = gsrq.kmeans(x, 16, iters=10, seed=_stage_seed(0, 0))
    # Stage 1 is an ordinary k-means of x, so its codebook has the data's scale...
    assert np.linalg.norm(rq.codebooks[0], axis=1).mean() == pytest.approx(
        np.linalg.norm(c1, axis=1).mean(), rel=0.05)
    # ...and stage 2 lowers the error further.
    one = gsrq.ResidualQuantizer.from_codebooks(rq.codebooks[:1])
    e1 = gsrq.reconstruction_metrics(x, one.decode(one.encode(x)))["mse"]
    e2 = gsrq.reconstruction_metrics(x, rq.decode(rq.encode(x)))["mse"]
    assert e2 < 0.9 * e1


def _stage_seed(seed, m):
    return seed  # only the scale is compared; the exact stage seed does not matter


# ---------------------------------------------------------------- metrics


def test_reconstruction_metrics_known_values():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    xh = np.array([[3.0, 0.0], [0.0, 0.0]])
    m = gsrq.reconstruction_metrics(x, xh)
    assert m["mse"] == pytest.approx(16 / 4)
    assert m["rel_mse"] == pytest.approx(16 / 25)
    assert m["cosine"] == pytest.approx((0.6 + 1.0) / 2)
    assert m["gain_error"] == pytest.approx((2 + 0) / 2 / 2.5)
    assert gsrq.reconstruction_metrics(x[:1], -x[:1])["cosine"] == pytest.approx(-1.0)
    with pytest.raises(ShapeError):
        gsrq.reconstruction_metrics(x, xh[:1])
    with pytest.raises(InvalidValueError):
        gsrq.reconstruction_metrics(x, np.full_like(xh, np.nan))


# ---------------------------------------------------------------- bad input


X = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)


@pytest.mark.parametrize("fn", [gsrq.kmeans, gsrq.gskm])
def test_bad_input_raises_named_errors(fn):
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InvalidValueError, match="row 3, column 2"):
        fn(bad, 4)
    bad[3, 2] = np.inf
    with pytest.raises(InvalidValueError):
        fn(bad, 4)
    big = X.astype(np.float64)
    big[1, 1] = 1e39  # beyond float32
    with pytest.raises(InvalidValueError, match="row 1, column 1"):
        fn(big, 4)
    with pytest.raises(InvalidValueError, match="exceeds"):
        fn(X, 51)
    with pytest.raises(InvalidValueError):
        fn(X, 0)
    with pytest.raises(ShapeError):
        fn(np.zeros((50, 0), np.float32), 4)
    with pytest.raises(ShapeError):
        fn(X[:, 0], 4)
    with pytest.raises(ShapeError):
        fn(X[None], 4)
    with pytest.raises(ShapeError):
        fn(X[:0], 1)
    with pytest.raises(ShapeError, match="real"):
        fn(X.astype(np.complex64), 4)
    with pytest.raises(ShapeError, match="weights"):
        fn(X, 4, weights=np.ones(49, np.float32))
    with pytest.raises(ShapeError, match="weights"):
        fn(X, 4, weights=np.ones((50, 1), np.float32))
    w = np.ones(50, np.float32)
    w[5] = -1
    with pytest.raises(InvalidValueError, match="negative"):
        fn(X, 4, weights=w)
    w[5] = np.nan
    with pytest.raises(InvalidValueError, match="finite"):
        fn(X, 4, weights=w)
    with pytest.raises(InvalidValueError, match="all zero"):
        fn(X, 4, weights=np.zeros(50, np.float32))
    with pytest.raises(InvalidValueError, match="threads"):
        fn(X, 4, threads=0)
    with pytest.raises(ShapeError, match="init_centroids"):
        fn(X, 4, init_centroids=np.zeros((3, 4), np.float32))
    # The errors are ValueErrors too.
    with pytest.raises(ValueError):
        fn(X, 51)


def test_bad_options_and_rq_input():
    with pytest.raises(InvalidValueError, match="init"):
        gsrq.kmeans(X, 4, init="kmeans--")
    with pytest.raises(InvalidValueError, match="method"):
        gsrq.ResidualQuantizer(4, 8, 2, "pq")
    rq = gsrq.ResidualQuantizer(4, 8, 2)
    with pytest.raises(InvalidValueError, match="fit"):
        rq.encode(X)
    with pytest.raises(ShapeError, match="dim"):
        rq.fit(np.zeros((50, 3), np.float32))
    with pytest.raises(InvalidValueError, match="codebook_size"):
        gsrq.ResidualQuantizer(4, 64, 1).fit(X)
    rq.fit(X)
    with pytest.raises(ShapeError):
        rq.decode(np.zeros((3, 3), np.uint16))
    with pytest.raises(InvalidValueError, match="out of range"):
        rq.decode(np.array([[0, 8]]))
    with pytest.raises(InvalidValueError, match="beam"):
        rq.encode(X, beam=0)
    with pytest.raises(ShapeError):
        gsrq.ResidualQuantizer.from_codebooks(np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidValueError):
        gsrq.ResidualQuantizer.from_codebooks(np.full((1, 2, 3), np.inf, np.float32))
    # The Rust layer validates too, when called directly.
    from gsrq import _gsrq

    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidValueError):
        _gsrq.kmeans(bad, 4)
    with pytest.raises(InvalidValueError):
        _gsrq.rq_encode(bad, np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ShapeError):
        _gsrq.rq_encode(X, np.zeros((1, 4, 5), np.float32))
    with pytest.raises(InvalidValueError):
        _gsrq.rq_decode(np.array([[9]], np.uint16), np.zeros((1, 4, 4), np.float32))


# ---------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 120), d=st.integers(1, 40), k_frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32), method=st.sampled_from(["km", "gskm"]),
)
def test_labels_are_nearest_codewords_and_history_is_monotone(n, d, k_frac, seed, method):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.1, 10)).astype(np.float32)
    k = max(1, int(k_frac * n))
    if method == "km":
        c, labels, hist = gsrq.kmeans(x, k, iters=5, seed=seed, return_history=True)
    else:
        c, labels, hist = gsrq.gskm(x, k, init_iters=3, iters=3, seed=seed, return_history=True)
    assert np.isfinite(c).all() and c.shape == (k, d)
    d2 = _sqdist(x, c)
    chosen = d2[np.arange(n), labels]
    # Distances are computed as ‖x‖² + ‖c‖² − 2⟨x, c⟩ in float32: absolute error ~1e-7·‖x‖².
    scale = float((x.astype(np.float64) ** 2).sum(1).max()) + float((c.astype(np.float64) ** 2).sum(1).max())
    if method == "km":
        assert np.all(np.diff(hist) <= 1e-5 * hist[:-1] + 1e-5 * scale * n)
    np.testing.assert_allclose(chosen, d2.min(1), rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(hist[-1], chosen.sum(), rtol=1e-4, atol=1e-5 * scale * n)
    # Greedy RQ encoding of one stage is the same nearest-codeword search.
    rq = gsrq.ResidualQuantizer.from_codebooks(c[None])
    np.testing.assert_allclose(rq.decode(rq.encode(x)), c[labels], rtol=1e-5, atol=1e-5 * (1 + np.abs(c).max()))
