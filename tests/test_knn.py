"""Exact k-NN (float32 and bfloat16 rankings) against a float64 brute force, with ties and near-ties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pn_jax import hardware, knn
from tests import reference


def decaying(rng, n, d, offset=3.0, decay=0.85):
    """Points with a decaying spectrum (real features are nearly low-rank; Gaussian noise is not)."""
    scale = decay ** np.arange(d)
    return (rng.normal(size=(n, d)) * scale * 10 + offset).astype(np.float32)


def all_paths(q, bank, k, block=4096):
    """(dist, idx) of the dense search and the prepared one, each with both rankings."""
    q, bank = jnp.asarray(q), jnp.asarray(bank)
    out = {"knn": knn.knn(q, bank, k=k, block=block, low=False),
           "knn_low": knn.knn(q, bank, k=k, block=block, low=True),
           "indexed": knn.knn_indexed(q, knn.prepare_bank(bank, low=False), k=k, block=block),
           "indexed_low": knn.knn_indexed(q, knn.prepare_bank(bank, low=True), k=k, block=block)}
    return {name: (np.asarray(d), np.asarray(i)) for name, (d, i) in out.items()}


def assert_identical(paths):
    d0, i0 = paths["knn"]
    for name, (d, i) in paths.items():
        np.testing.assert_array_equal(i, i0, err_msg=name)
        np.testing.assert_array_equal(d, d0, err_msg=name)  # bit for bit


@pytest.mark.parametrize("k", [1, 9])
@pytest.mark.parametrize("block", [32, 4096])
def test_all_paths_equal_bruteforce(k, block):
    rng = np.random.default_rng(k)
    bank = decaying(rng, 700, 24)
    q = decaying(rng, 60, 24)
    paths = all_paths(q, bank, k, block=block)
    assert_identical(paths)
    d_ref, i_ref = reference.knn_bruteforce(q, bank, k)
    np.testing.assert_array_equal(paths["knn"][1], i_ref)
    np.testing.assert_allclose(paths["knn"][0], d_ref, rtol=1e-6)


def test_gaussian_and_offset_data():
    """Large |x| against small distances: the expanded form alone cannot rank these."""
    rng = np.random.default_rng(0)
    bank = (rng.normal(size=(300, 16)) + 300).astype(np.float32)
    q = (rng.normal(size=(50, 16)) + 300).astype(np.float32)
    paths = all_paths(q, bank, 5)
    assert_identical(paths)
    np.testing.assert_array_equal(paths["knn"][1], reference.knn_bruteforce(q, bank, 5)[1])


def test_exact_ties_go_to_the_lower_index():
    # Bank entries at q +- r e_i are all exactly at distance r (the residuals are exact), and
    # duplicated rows tie too: the lower index must come first, on every path.
    rng = np.random.default_rng(1)
    d = 8
    centre = np.round(rng.normal(size=d) * 4).astype(np.float32)
    ring = np.concatenate([centre + 2 * np.eye(d), centre - 2 * np.eye(d)]).astype(np.float32)
    far = (rng.normal(size=(200, d)) * 3 + 40).astype(np.float32)
    bank = np.concatenate([far[:100], ring, far[100:], ring[::-1]])      # every ring row twice
    dup = bank[[5, 17, 150]]
    q = np.concatenate([centre[None], dup, far[:3] + 0.25]).astype(np.float32)
    for k in (1, 9, 20):
        paths = all_paths(q, bank, k)
        assert_identical(paths)
        d_ref, i_ref = reference.knn_bruteforce(q, bank, k)
        np.testing.assert_array_equal(paths["knn"][1], i_ref)
        assert np.all(paths["knn"][0][0] == 2.0)                      # the ring: exact ties
        assert list(paths["knn"][1][0][:3]) == [100, 101, 102][:k]


def test_near_ties_beyond_the_expanded_form_take_the_fallback():
    # Entries at distances 1, 1 + 1e-4, ... from a query far from the origin: the expanded
    # form errs by ~|q|^2 * 1e-7 ~ 0.1 in d^2, more than the gaps, so the proof must fail and
    # the residual brute force must decide.
    rng = np.random.default_rng(2)
    d = 16
    q = np.full((1, d), 1000.0, np.float32)
    dirs = rng.normal(size=(30, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    radii = 1.0 + 1e-4 * rng.permutation(30)
    bank = (q + dirs * radii[:, None]).astype(np.float32)
    bank = np.concatenate([(rng.normal(size=(100, d)) * 5 + 1000).astype(np.float32), bank])
    idx = knn.prepare_bank(jnp.asarray(bank), low=True)
    stats = knn.search_stats(jnp.asarray(q), idx, 5)
    assert float(stats["dense_proven"]) == 0.0                         # the fallback ran
    assert float(stats["low_proven"]) == 0.0                           # (both of them)
    paths = all_paths(q, bank, 5)
    assert_identical(paths)
    np.testing.assert_array_equal(paths["knn"][1], reference.knn_bruteforce(q, bank, 5)[1])


def test_small_banks():
    rng = np.random.default_rng(4)
    bank = decaying(rng, 400, 12)
    q = decaying(rng, 40, 12)
    for m in (1, 7, 12):                                               # fewer rows than n_refine_low
        small = bank[:m]
        k = min(m, 7)
        paths = all_paths(q, small, k)
        assert_identical(paths)
        np.testing.assert_array_equal(paths["knn"][1], reference.knn_bruteforce(q, small, k)[1])


def test_k_larger_than_bank_is_rejected():
    with pytest.raises(ValueError, match="memory bank has only 5"):
        knn.knn_indexed(jnp.zeros((3, 4)), knn.prepare_bank(jnp.zeros((5, 4))), k=9)


def test_smallest_equals_top_k_with_ties():
    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.integers(0, 40, size=(16, 1000)).astype(np.float32))  # many exact ties
    for n in (1, 5, 17):
        for group in (8, 32):
            v, i = knn.smallest(s, n, group)
            neg, j = jax.lax.top_k(-s, n)
            np.testing.assert_array_equal(np.asarray(i), np.asarray(j))
            np.testing.assert_array_equal(np.asarray(v), -np.asarray(neg))


def test_distances_are_differentiable_through_every_path():
    rng = np.random.default_rng(6)
    bank = jnp.asarray(decaying(rng, 300, 10))
    q = jnp.asarray(decaying(rng, 20, 10))
    index = knn.prepare_bank(bank, low=True)
    _, idx = knn.knn(q, bank, 3)
    want = jax.grad(lambda x: jnp.sum(knn.exact_distances(x, bank, idx)))(q)
    for f in (lambda x: knn.knn(x, bank, 3)[0], lambda x: knn.knn_indexed(x, index, 3)[0]):
        got = jax.grad(lambda x: jnp.sum(f(x)))(q)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_inside_lax_map_and_batched():
    rng = np.random.default_rng(7)
    bank = jnp.asarray(decaying(rng, 500, 16))
    f = jnp.asarray(decaying(rng, 3 * 40, 16)).reshape(3, 40, 16)
    index = knn.prepare_bank(bank)
    d1, i1 = jax.jit(lambda f: jax.lax.map(lambda x: knn.knn_indexed(x, index, 4), f))(f)
    d2, i2 = knn.knn_batched(f, bank, 4)
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))


def test_residual_distance_bits_do_not_depend_on_the_call_shape():
    # The paths compare distances computed in calls of different shapes; their bits must agree.
    rng = np.random.default_rng(8)
    bank = jnp.asarray(decaying(rng, 400, 64))
    q = jnp.asarray(decaying(rng, 50, 64))
    idx = jnp.asarray(rng.integers(0, 400, size=(50, 12)).astype(np.int32))
    full = np.asarray(knn.exact_distances(q, bank, idx))
    np.testing.assert_array_equal(np.asarray(knn.exact_distances(q, bank, idx[:, 3:5])), full[:, 3:5])
    np.testing.assert_array_equal(np.asarray(knn.exact_distances(q[7:9], bank, idx[7:9])), full[7:9])
    one = np.asarray(knn.knn(q[:1], bank, 400)[0])        # every entry, one query: the brute-force shape
    np.testing.assert_array_equal(np.sort(one[0]), np.sort(np.asarray(knn.exact_distances(
        q[:1], bank, jnp.arange(400, dtype=jnp.int32)[None]))[0]))


@pytest.mark.parametrize("case", ["random", "ties", "near_ties", "few_left"])
def test_knn_excluding_equals_the_search_of_the_remaining_rows(case):
    """Leave-one-image-out search: the same distances and (mapped) indices as `knn` on the bank
    with the excluded rows deleted, including ties across the cut, near-ties that need the
    brute force (with excluded rows nearer than every kept one) and fewer than n_refine rows left."""
    rng = np.random.default_rng(7)
    k = 3
    if case == "near_ties":
        d = 16
        q = np.full((2, d), 1000.0, np.float32)
        dirs = rng.normal(size=(30, d))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        bank = (q[0] + dirs * (1.0 + 1e-4 * rng.permutation(30))[:, None]).astype(np.float32)
        bank = np.concatenate([bank, q[:1] + 1e-3, (rng.normal(size=(60, d)) * 5 + 1000).astype(np.float32)])
        excluded = np.zeros(len(bank), bool)
        excluded[[0, 3, 30]] = True  # the query's own copy (nearest of all) is excluded
    else:
        bank = decaying(rng, 200, 12)
        q = decaying(rng, 20, 12)
        excluded = rng.random(200) < 0.3
        if case == "ties":
            bank[50] = bank[10]
            excluded[10], excluded[50] = True, False   # the tie's lower index is excluded
            q[0] = bank[10]
            bank[120:130] = bank[60]                  # a tie among kept rows
            excluded[120:130] = False
            q[1] = bank[60]
        if case == "few_left":
            excluded[:] = True
            excluded[[5, 90, 150, 199]] = False       # 4 rows left < n_refine(3) = 6
    kept = np.flatnonzero(~excluded)
    d_ref, i_ref = knn.knn(jnp.asarray(q), jnp.asarray(bank[kept]), k=k, block=64, low=False)
    for low in (False, True):
        for target in (jnp.asarray(bank), knn.prepare_bank(jnp.asarray(bank), low=low)):
            d_ex, i_ex = knn.knn_excluding(jnp.asarray(q), target, jnp.asarray(excluded), k=k, block=64, low=low)
            np.testing.assert_array_equal(np.asarray(i_ex), kept[np.asarray(i_ref)])
            np.testing.assert_array_equal(np.asarray(d_ex), np.asarray(d_ref))
    _, i_bf = reference.knn_bruteforce(q, bank[kept], k)
    np.testing.assert_array_equal(np.asarray(i_ex), kept[i_bf])


def test_bf16_ranking_misorders_yet_the_answer_is_exact():
    """Neighbours closer together than bfloat16 can resolve: the bf16 ranking puts them in the
    wrong order (checked), the proof fails for those queries, and the float32 chunks answer;
    queries with a clear nearest neighbour are proven by the bf16 bound alone."""
    rng = np.random.default_rng(3)
    d = 32
    centre = (rng.normal(size=d) * 10).astype(np.float32)
    dirs = rng.normal(size=(40, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    shell = (centre + dirs * (5.0 + 1e-3 * rng.permutation(40))[:, None]).astype(np.float32)
    far = (rng.normal(size=(400, d)) * 10).astype(np.float32)
    bank = np.concatenate([far, shell])
    q = np.concatenate([centre[None], far[:70] + 0.01 * rng.normal(size=(70, d))]).astype(np.float32)
    ranks = np.argsort(np.asarray(jnp.sum((jnp.asarray(q[:1]).astype(jnp.bfloat16).astype(jnp.float32)
                                            - jnp.asarray(bank).astype(jnp.bfloat16).astype(jnp.float32)) ** 2, -1)))
    exact = reference.knn_bruteforce(q[:1], bank, 5)[1][0]
    assert list(ranks[:5]) != list(exact)                               # bf16 alone gets it wrong
    stats = knn.search_stats(jnp.asarray(q), knn.prepare_bank(jnp.asarray(bank), low=True), 5)
    assert 0.0 < float(stats["low_proven"]) < 1.0
    paths = all_paths(q, bank, 5)
    assert_identical(paths)
    np.testing.assert_array_equal(paths["knn"][1], reference.knn_bruteforce(q, bank, 5)[1])
    ex = rng.random(len(bank)) < 0.2
    d_ex, i_ex = knn.knn_excluding(jnp.asarray(q), knn.prepare_bank(jnp.asarray(bank), low=True),
                                   jnp.asarray(ex), k=5)
    kept = np.flatnonzero(~ex)
    np.testing.assert_array_equal(np.asarray(i_ex), kept[reference.knn_bruteforce(q, bank[kept], 5)[1]])
    # Gradients flow through both kinds of query (proven by bf16, and settled by the fallback).
    g = jax.grad(lambda x: knn.knn(x, jnp.asarray(bank), k=5, low=True)[0].sum())(jnp.asarray(q))
    nb = bank[paths["knn"][1]]                                          # [Q, 5, D]
    diff = q[:, None, :].astype(np.float64) - nb
    ref = (diff / np.linalg.norm(diff, axis=-1, keepdims=True)).sum(1)
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the bounds at their edges
def bf16_midpoint_case(d=32):
    """A true nearest neighbour whose coordinates sit just above bfloat16 rounding midpoints
    (1 + 2^-8 + 2^-16 rounds up to 1 + 2^-7: a relative error of almost 2^-8), against
    bf16-exact decoys that are truly farther but nearer after rounding. Rows come with their
    negations so the bank mean (the bf16 path's centre) is exactly 0, and the query is that mean.
    A bound with 2^-9 per coordinate proves the decoy (issue 22); 2^-8 must not."""
    n_decoys = knn.n_refine_low(1)          # exactly the refined ones: a is the next one kept
    assert n_decoys % 2 == 0
    a = np.full(d, 1 + 2.0 ** -8 + 2.0 ** -16, np.float32)
    decoys = []
    for j in range(n_decoys // 2):          # d/2 + 1 coordinates at 1 + 2^-7, the rest at 1
        b = np.ones(d, np.float32)
        b[(np.arange(d // 2 + 1) + 3 * j) % d] = 1 + 2.0 ** -7
        decoys.append(b)
    bank = np.stack([a, -a] + decoys + [-b for b in decoys])
    q = np.zeros((1, d), np.float32)
    return q, bank


def cancellation_case(rng, scale=4096.0, d=16, n=40):
    """Rows c + small offsets with |c|^2 ~ 2^28: the norm column's rounding (ulp ~ 16) exceeds
    the gaps between the true d^2 (~1e-2), so the float32 ranking cannot order them."""
    c = np.full(d, scale, np.float32)
    bank = (c + rng.normal(size=(n, d)) * 0.05).astype(np.float32)
    bank = np.concatenate([bank, (c + rng.normal(size=(100, d)) * 3).astype(np.float32)])
    q = (c + rng.normal(size=(6, d)) * 0.05).astype(np.float32)
    return q, bank


def bound_cases():
    rng = np.random.default_rng(11)
    cases = {"midpoints": bf16_midpoint_case(), "cancellation": cancellation_case(rng)}
    cases["random"] = (decaying(rng, 40, 64), decaying(rng, 300, 64))
    big = rng.normal(size=(200, 256)).astype(np.float32) * np.float32(2.0 ** 20)
    cases["large_norms"] = (big[:20] + rng.normal(size=(20, 256)).astype(np.float32), big)
    return cases


def _rank_values(q, aug, ones):
    qa = knn._augment_queries(jnp.asarray(q), ones).astype(aug.dtype)
    return jax.lax.dot_general(qa, aug, (((1,), (1,)), ((), ())), precision=knn.HIGHEST,
                               preferred_element_type=jnp.float32)


def _d64(q, bank):
    return np.sqrt(((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))


@pytest.mark.parametrize("case", ["midpoints", "cancellation", "random", "large_norms"])
def test_lower_bounds_hold_for_every_entry(case):
    """The proofs' lower bounds, evaluated on every (query, bank row) at that row's own ranking
    value, never exceed the float64 distance: float32 ranking and bfloat16 ranking."""
    q, bank = bound_cases()[case]
    m = len(bank)
    d64 = _d64(q, bank)
    aug, sq = knn.augment_rows(jnp.asarray(bank))
    t = _rank_values(q, aug, 1)[:, :m]
    lb = np.asarray(knn.dense_lower_bound(jnp.asarray(q), t, knn.max_norm_bound(sq, bank.shape[1])), np.float64)
    assert np.all(lb <= d64), (lb - d64).max()
    mean = jnp.mean(jnp.asarray(bank), axis=0)
    low = knn.augment_low(jnp.asarray(bank), mean)
    xf = jnp.asarray(q) - mean
    t_low = _rank_values(xf.astype(knn.LOW), low.aug, 3)[:, :m]
    lb_low = np.asarray(knn.low_lower_bound(xf, t_low, low), np.float64)
    assert np.all(lb_low <= d64), (lb_low - d64).max()


def test_a_2_pow_minus_9_bf16_bound_is_fooled_at_the_midpoints(monkeypatch):
    """The boundary input really is one: bf16 rounding ranks the decoys first, and the old
    per-coordinate bound (1.01 * 2^-9) puts the true neighbour above its own distance."""
    q, bank = bf16_midpoint_case()
    d64 = _d64(q, bank)
    assert np.argmin(d64[0]) == 0
    rounded = _d64(np.asarray(jnp.asarray(q).astype(jnp.bfloat16).astype(jnp.float32)),
                   np.asarray(jnp.asarray(bank).astype(jnp.bfloat16).astype(jnp.float32)))
    assert rounded[0, 2] < rounded[0, 0]                                # a decoy wins after rounding
    mean = jnp.zeros(bank.shape[1], jnp.float32)
    low = knn.augment_low(jnp.asarray(bank), mean)
    t_low = _rank_values(jnp.asarray(q).astype(knn.LOW), low.aug, 3)[:, :len(bank)]
    monkeypatch.setattr(knn, "EPS_LOW", 1.01 * 2.0 ** -9)
    lb_old = np.asarray(knn.low_lower_bound(jnp.asarray(q), t_low, low), np.float64)
    assert lb_old[0, 0] > d64[0, 0]                                     # the old bound is wrong here


def test_bf16_midpoints_fool_no_path():
    q, bank = bf16_midpoint_case()
    stats = knn.search_stats(jnp.asarray(q), knn.prepare_bank(jnp.asarray(bank), low=True), 1)
    assert float(stats["low_proven"]) == 0.0                            # the bf16 bound refuses it
    for k in (1, 2):
        paths = all_paths(q, bank, k)
        assert_identical(paths)
        d_ref, i_ref = reference.knn_bruteforce(q, bank, k)
        np.testing.assert_array_equal(paths["knn"][1], i_ref)
        assert list(i_ref[0][:2]) == [0, 1][:k]                         # a and its exact tie -a
    ex = np.zeros(len(bank), bool)
    ex[1] = True                                                        # the tie's twin excluded
    for target in (jnp.asarray(bank), knn.prepare_bank(jnp.asarray(bank), low=True)):
        _, i_ex = knn.knn_excluding(jnp.asarray(q), target, jnp.asarray(ex), k=2, low=True)
        np.testing.assert_array_equal(np.asarray(i_ex)[0], [0, 2])


def test_norm_column_rounding_beyond_the_gaps():
    """Far from the origin the stored norms' rounding decides the float32 ranking: the proofs
    must fail and the residual search decide; every path equals the float64 brute force
    wherever float64 separates the candidates by more than the distance's own rounding."""
    q, bank = cancellation_case(np.random.default_rng(12))
    for k in (1, 5):
        paths = all_paths(q, bank, k)
        assert_identical(paths)
        d_ref, i_ref = reference.knn_bruteforce(q, bank, k)
        np.testing.assert_allclose(paths["knn"][0], d_ref, rtol=4 * knn._delta(bank.shape[1]))
        d64 = _d64(q, bank)
        got = np.take_along_axis(d64, paths["knn"][1], 1)
        # Where the indices differ, the two rows are a float32 near-tie (within 2 delta).
        assert np.all(np.abs(got - d_ref) <= 2 * knn._delta(bank.shape[1]) * d_ref + 1e-12)


# ----------------------------------------------------------------------------- path choice
def test_bf16_ranking_chosen_by_cpu_capability(monkeypatch):
    monkeypatch.delenv(hardware.ENV, raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    r = hardware.knn_ranking("cpu")
    assert r["bfloat16"] is False and "no native bf16" in r["reason"]
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert hardware.knn_ranking("cpu")["bfloat16"] is True
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert hardware.knn_ranking("cpu")["bfloat16"] is True
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset())    # ARM, unknown: float32
    assert hardware.knn_ranking("cpu")["bfloat16"] is False
    monkeypatch.setenv(hardware.ENV, "bfloat16")
    assert hardware.knn_ranking("cpu")["bfloat16"] is True
    assert hardware.knn_ranking("gpu")["bfloat16"] is False            # never off the CPU
    monkeypatch.setenv(hardware.ENV, "fp8")
    with pytest.raises(ValueError, match=hardware.ENV):
        hardware.knn_ranking("cpu")


def test_bf16_ranking_refused_off_the_cpu():
    for backend in ("gpu", "cuda", "tpu"):
        with pytest.raises(ValueError, match="low=False"):
            knn.check_low(backend)
    knn.check_low("cpu")
    assert knn.default_low("gpu") is False and knn.default_low("tpu") is False


def test_query_chunks_give_the_same_bits_and_bound_the_scores_held(monkeypatch):
    """Above knn.QUERY_SCORES candidate scores a search runs its queries in chunks; every
    row's search is its own, so the chunked answer is the whole call's, bit for bit."""
    rng = np.random.default_rng(3)
    bank = jnp.asarray(rng.normal(size=(700, 32)).astype(np.float32))
    q = jnp.asarray(rng.normal(size=(2048, 32)).astype(np.float32))
    excluded = jnp.asarray(rng.random(700) < 0.2)
    index = knn.prepare_bank(bank)
    assert knn.query_chunk(2048, 700, budget=1 << 18) == 256 and knn.query_chunk(2048, 700) == 2048
    assert knn.query_chunk(16384, 65536, knn.QUERY_SCORES) == 2048  # 1024 px, a 400-image bank
    # the default budget is shared by the batches the CPU scores at once: two streams hold what one did
    monkeypatch.setattr(hardware, "cpu_streams", lambda backend=None: 2)
    assert knn.query_chunk(16384, 65536) == 1024
    monkeypatch.setattr(hardware, "cpu_streams", lambda backend=None: 1)
    assert knn.query_chunk(16384, 65536) == 2048
    for whole, search in [
        (knn.knn(q, bank, k=5, block=256), lambda x: knn.knn(x, bank, k=5, block=256)),
        (knn.knn_indexed(q, index, k=5, block=256), lambda x: knn.knn_indexed(x, index, k=5, block=256)),
        (knn.knn_excluding(q, index, excluded, k=5, block=256),
         lambda x: knn.knn_excluding(x, index, excluded, k=5, block=256)),
    ]:
        got = knn.by_query_chunks(search, q, 700, budget=1 << 18)  # 8 chunks of 256 rows
        for a, b in zip(whole, got):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
