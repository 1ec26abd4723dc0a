"""FID / IS / KID / precision-recall and statistics files against references and hand-checkable cases."""

import ast
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

from diffjax.evaluation import metrics
from diffjax.evaluation.metrics import (
    ExtractorMismatchError,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_stats,
    precision_recall,
    save_stats,
)


def _pytorch_fid_frechet():
    """pytorch-fid's own ``calculate_frechet_distance``, compiled from its installed source.

    Importing ``pytorch_fid.fid_score`` pulls in torchvision, whose CUDA-built ops fail to load against
    the CPU torch here; the function itself needs only numpy and scipy, so it is lifted out of the file
    without importing the module (and without touching ``sys.modules``)."""
    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = (Path(next(iter(spec.submodule_search_locations))) / "fid_score.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    namespace = {"np": np, "linalg": linalg}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "pytorch_fid/fid_score.py", "exec"), namespace)
    return namespace["calculate_frechet_distance"]


def _random_stats(rng, n, d, shift=0.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + shift
    return feature_statistics(x)


# ---------------------------------------------------------------- FID


def test_fid_matches_pytorch_fid():
    reference = _pytorch_fid_frechet()
    if reference is None:
        pytest.skip("pytorch-fid not installed")
    rng = np.random.default_rng(0)
    for d, shift in ((8, 0.3), (64, 0.0), (64, 1.0)):
        mu1, s1 = _random_stats(rng, 500, d)
        mu2, s2 = _random_stats(rng, 400, d, shift)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # sqrtm(disp=False) on new scipy
            expected = reference(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fid_closed_forms():
    # 1-D Gaussians: W2^2 = (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # Diagonal covariances commute: sqrt(S1 S2) is elementwise.
    rng = np.random.default_rng(1)
    v1, v2 = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_sample_sets():
    rng = np.random.default_rng(2)
    d = 16
    a = rng.normal(size=(4000, d))
    mu, sigma = feature_statistics(a)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    halves = frechet_distance(*feature_statistics(a[:2000]), *feature_statistics(a[2000:]))
    assert 0 < halves < 0.5
    shifted = frechet_distance(mu, sigma, *feature_statistics(a + 3.0))
    assert shifted == pytest.approx(9.0 * d, rel=1e-6)
    noise = frechet_distance(mu, sigma, *feature_statistics(5.0 * rng.normal(size=(4000, d)) + 10))
    assert noise > 100 * halves and noise > 1000


def test_fid_singular_product_falls_back_to_offset():
    # Rank-deficient covariances (fewer samples than dims): still a finite, non-negative value.
    rng = np.random.default_rng(3)
    mu1, s1 = feature_statistics(rng.normal(size=(5, 12)))
    mu2, s2 = feature_statistics(rng.normal(size=(5, 12)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0


def _rank_deficient_pairs(rng):
    """(mu1, s1, mu2, s2) from 10 samples of 64-d features: rank <= 9. The second pair has always-zero
    features (dead ReLUs, as real extractors give): scipy's sqrtm warns "Matrix is singular" on that
    product (LinAlgWarning, scipy 1.17) while returning a finite, accurate root."""
    yield *feature_statistics(rng.normal(size=(10, 64))), *feature_statistics(rng.normal(size=(10, 64)) + 0.5)
    a, b = np.maximum(rng.normal(size=(2, 10, 64)), 0.0)
    a[:, ::3] = b[:, ::3] = 0.0
    yield *feature_statistics(a), *feature_statistics(b)


def test_fid_rank_deficient_no_linalg_warning_matches_pytorch_fid():
    reference = _pytorch_fid_frechet()
    if reference is None:
        pytest.skip("pytorch-fid not installed")
    for mu1, s1, mu2, s2 in _rank_deficient_pairs(np.random.default_rng(4)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = frechet_distance(mu1, s1, mu2, s2)
        assert not [w for w in caught if issubclass(w.category, linalg.LinAlgWarning)], [str(w.message) for w in caught]
        assert np.isfinite(value) and value > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its sqrtm(disp=False): a DeprecationWarning on new scipy
            expected = reference(mu1, s1, mu2, s2)
        assert value == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fid_non_finite_root_retries_with_offset_like_pytorch_fid(monkeypatch, capsys):
    # A non-finite first root (forced: a stand-in sqrtm returns NaN for the plain product) takes
    # pytorch-fid's way out: eps on both diagonals, one line saying so, no warning.
    reference = _pytorch_fid_frechet()
    if reference is None:
        pytest.skip("pytorch-fid not installed")
    real_sqrtm, calls = linalg.sqrtm, []

    def sqrtm(a, disp=True):
        calls.append(a)
        root = np.full(a.shape, np.nan) if len(calls) == 1 else real_sqrtm(a)
        return root if disp else (root, 0.0)

    monkeypatch.setattr(linalg, "sqrtm", sqrtm)  # the scipy.linalg both implementations call
    mu1, s1, mu2, s2 = next(_rank_deficient_pairs(np.random.default_rng(5)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = frechet_distance(mu1, s1, mu2, s2)
    assert caught == [] and len(calls) == 2
    np.testing.assert_array_equal(calls[1], (s1 + 1e-6 * np.eye(64)) @ (s2 + 1e-6 * np.eye(64)))
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "singular" in out.err and "1e-06" in out.err
    calls.clear()
    expected = reference(mu1, s1, mu2, s2)
    assert len(calls) == 2 and np.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_feature_statistics_is_float64_rowvar_false():
    x = np.random.default_rng(4).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64).T), rtol=1e-12)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: feature_statistics(np.zeros(5)), "features: expected a 2-D"),
        (lambda: feature_statistics(np.zeros((1, 4))), "features: needs at least 2"),
        (lambda: feature_statistics(np.array([[0.0, np.nan], [1, 2]])), "features: contains 1 NaN"),
        (lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "mu2: expected shape"),
        (lambda: frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), r"sigma1: expected a \(3, 3\)"),
        (lambda: frechet_distance(np.zeros(2), np.eye(2), [np.nan, 0], np.eye(2)), "mu2: contains NaN"),
    ],
)
def test_fid_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- IS


def _is_direct(logits, splits):
    """Textbook IS, loops and all: exp(mean_x sum_y p(y|x) log(p(y|x) / p(y))) per split."""
    scores = []
    n = len(logits)
    for i in range(splits):
        part = logits[i * n // splits : (i + 1) * n // splits]
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        kl = [sum(pi[c] * np.log(pi[c] / py[c]) for c in range(len(py)) if pi[c] > 0) for pi in p]
        scores.append(np.exp(np.mean(kl)))
    return np.mean(scores), np.std(scores)


def test_inception_score_hand_made():
    assert inception_score(np.zeros((20, 1008)), splits=10) == pytest.approx((1.0, 0.0))
    # k classes, equally used, each predicted with certainty: IS = k in every split.
    k = 5
    confident = np.full((100, 1008), -1e4)
    confident[np.arange(100), np.arange(100) % k] = 0.0
    assert inception_score(confident, splits=10) == pytest.approx((k, 0.0), abs=1e-9)
    # All samples confident in one class: p(y|x) = p(y), IS = 1.
    one = np.full((30, 1008), -50.0)
    one[:, 7] = 50.0
    assert inception_score(one, splits=3)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_matches_direct_formula():
    logits = np.random.default_rng(5).normal(scale=3.0, size=(53, 12))
    for splits in (1, 4, 10):
        assert inception_score(logits, splits) == pytest.approx(_is_direct(logits, splits), rel=1e-10)


@pytest.mark.parametrize(
    "logits, splits, match",
    [
        (np.zeros((5, 10)), 10, "logits: needs at least 10"),
        (np.zeros(10), 1, "logits: expected a 2-D"),
        (np.zeros((10, 10)), 0, "splits: expected a positive int"),
        (np.full((10, 10), np.nan), 1, "logits: contains 100 NaN"),
    ],
)
def test_inception_score_bad_input(logits, splits, match):
    with pytest.raises(ValueError, match=match):
        inception_score(logits, splits)


# ---------------------------------------------------------------- KID


def _mmd2_loops(x, y, degree=3, coef0=1.0):
    """Unbiased MMD^2 by explicit double loops over pairs."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + coef0) ** degree  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_loop_reference():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.3, 1.2, size=(25, 5))
    # One subset covering all of the smaller set: the permutation of a full set changes nothing.
    mean, std = kernel_inception_distance(x[:25], y, subsets=1, subset_size=25)
    assert mean == pytest.approx(_mmd2_loops(x[:25], y), rel=1e-10) and std == 0.0
    # Several subsets: the same index draws (RandomState(seed), set 1 then set 2) through the loop version.
    mean, std = kernel_inception_distance(x, y, subsets=4, subset_size=10, seed=3)
    state = np.random.RandomState(3)
    ref = [_mmd2_loops(x[state.choice(30, 10, replace=False)], y[state.choice(25, 10, replace=False)]) for _ in range(4)]
    assert (mean, std) == pytest.approx((np.mean(ref), np.std(ref)), rel=1e-10)


def test_kid_same_and_shifted_distributions():
    # Unbiased: over independent same-distribution pairs the estimates average to ~0 (and go negative).
    rng = np.random.default_rng(7)
    same = [
        kernel_inception_distance(rng.normal(size=(100, 16)), rng.normal(size=(100, 16)), subsets=1)[0] for _ in range(40)
    ]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) and min(same) < 0
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    shifted_mean, shifted_std = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert shifted_mean > 1.0 and shifted_mean > 100 * np.std(same) and shifted_std < shifted_mean


def test_kid_caps_subset_size_at_smaller_set():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(40, 4)), rng.normal(size=(15, 4))
    capped = kernel_inception_distance(x, y, subsets=3, subset_size=1000, seed=1)
    assert capped == kernel_inception_distance(x, y, subsets=3, subset_size=15, seed=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feats1=np.zeros((1, 3)), feats2=np.zeros((5, 3))), "feats1: needs at least 2"),
        (dict(feats1=np.zeros((5, 3)), feats2=np.zeros((5, 4))), "feats2: expected feature dimension 3"),
        (dict(feats1=np.zeros((5, 3)), feats2=np.zeros((5, 3)), subsets=0), "subsets: expected a positive int"),
        (dict(feats1=np.zeros((5, 3)), feats2=np.zeros((5, 3)), subset_size=1), "subset_size: the unbiased"),
    ],
)
def test_kid_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernel_inception_distance(**kwargs)


# ---------------------------------------------------------------- precision / recall


def _pr_brute(real, fake, k):
    def radii(a):
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(q, ref, r):
        return (np.linalg.norm(q[:, None] - ref[None], axis=-1) <= r[None]).any(1).mean()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_hand_checkable():
    line = np.arange(20.0)[:, None]
    assert precision_recall(line, line, k=3) == (1.0, 1.0)
    assert precision_recall(line, line + 1000.0, k=3) == (0.0, 0.0)
    # Fake samples lie densely on the left half of the real segment. Real radius (k=3) is 3, so every
    # fake point is on the real manifold; fake radius is 0.75, so exactly real points 0..9 are covered.
    real = np.arange(20.0)[:, None]
    fake = np.linspace(0.0, 9.0, 37)[:, None]
    precision, recall = precision_recall(real, fake, k=3)
    assert (precision, recall) == (1.0, 0.5)
    # 2-D: two real clusters, the fake set covers one of them.
    rng = np.random.default_rng(9)
    real2 = np.concatenate([rng.normal(size=(100, 2)), rng.normal(size=(100, 2)) + 50])
    fake2 = rng.normal(size=(100, 2))
    precision, recall = precision_recall(real2, fake2, k=3)
    assert precision > 0.95 and recall == pytest.approx(0.5, abs=0.05)


def test_precision_recall_blocked_jax_equals_brute_force():
    rng = np.random.default_rng(10)
    real = rng.normal(size=(157, 6))
    fake = rng.normal(0.4, 1.3, size=(131, 6))
    expected = _pr_brute(real, fake, k=3)
    # Blocks smaller than, dividing and not dividing the sets, and one block for everything.
    for block_size in (16, 131, 50, 4096):
        assert precision_recall(real, fake, k=3, block_size=block_size) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(real, fake, k=5, block_size=40) == pytest.approx(_pr_brute(real, fake, 5), abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(real=np.zeros((3, 2)), fake=np.zeros((10, 2))), "real: needs at least 4"),
        (dict(real=np.zeros((10, 2)), fake=np.zeros((10, 3))), "fake: expected feature dimension 2"),
        (dict(real=np.zeros((10, 2)), fake=np.zeros((10, 2)), k=0), "k: expected a positive int"),
        (dict(real=np.zeros((10, 2, 1)), fake=np.zeros((10, 2))), "real: expected a 2-D"),
    ],
)
def test_precision_recall_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        precision_recall(**kwargs)


# ---------------------------------------------------------------- statistics files


def test_stats_round_trip(tmp_path):
    mu, sigma = _random_stats(np.random.default_rng(11), 100, 5)
    meta = dict(extractor="ab" * 32, num_images=100, source="cifar10", split="train")
    path = save_stats(tmp_path / "sub" / "ref.npz", mu, sigma, meta)
    assert path == tmp_path / "sub" / "ref.npz" and sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]
    loaded = load_stats(path, expect_extractor="ab" * 32)
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    assert loaded.meta == meta and isinstance(loaded.meta["num_images"], int)
    # The published tools read exactly these two keys with allow_pickle off.
    with np.load(path, allow_pickle=False) as f:
        np.testing.assert_array_equal(f["mu"][:], mu)
        assert f["sigma"].dtype == np.float64


def test_published_files_load(tmp_path):
    mu, sigma = _random_stats(np.random.default_rng(12), 100, 4)
    np.savez(tmp_path / "fid_stats.npz", mu=mu.astype(np.float32), sigma=sigma)  # pytorch-fid / EDM layout
    loaded = load_stats(tmp_path / "fid_stats.npz")
    assert loaded.mu.dtype == np.float64 and loaded.meta == {}
    np.savez(tmp_path / "pickled.npz", mu=mu, sigma=sigma, extra=np.array([{}], dtype=object), note="x")
    with pytest.warns(UserWarning, match="skipping key 'extra'"):
        assert load_stats(tmp_path / "pickled.npz").meta == {"note": "x"}
    with pytest.warns(UserWarning, match="no 'extractor' key"):
        load_stats(tmp_path / "fid_stats.npz", expect_extractor="cd" * 32)
    # score_sde stores raw activations under pool_3.
    acts = np.random.default_rng(13).normal(size=(60, 4))
    np.savez(tmp_path / "cifar10_stats.npz", pool_3=acts)
    loaded = load_stats(tmp_path / "cifar10_stats.npz")
    np.testing.assert_allclose(loaded.sigma, np.cov(acts, rowvar=False))


def test_stats_extractor_mismatch(tmp_path):
    save_stats(tmp_path / "a.npz", np.zeros(2), np.eye(2), {"extractor": "aa" * 32})
    with pytest.raises(ExtractorMismatchError, match=f"computed with extractor {'aa' * 32}, expected {'bb' * 32}"):
        load_stats(tmp_path / "a.npz", expect_extractor="bb" * 32)
    assert issubclass(ExtractorMismatchError, ValueError)
    assert load_stats(tmp_path / "a.npz").meta["extractor"] == "aa" * 32  # no expectation, no check


def test_stats_bad_files(tmp_path):
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3), extractor="x")
    with pytest.raises(ValueError, match=r"nomu.npz: expected keys 'mu' and 'sigma'.*found \['extractor', 'sigma'\]"):
        load_stats(tmp_path / "nomu.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"shape.npz \(keys \['mu', 'sigma'\]\): sigma: expected a \(3, 3\)"):
        load_stats(tmp_path / "shape.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_stats(tmp_path / "plain.npy")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_stats(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    "path, meta, match",
    [
        ("x.npy", {}, "path: expected a file name ending in .npz"),
        ("x.npz", {"mu": 1}, "meta: key 'mu' is reserved"),
        ("x.npz", {"bad key": 1}, "not an identifier-like"),
        ("x.npz", {"extractor": None}, r"meta\['extractor'\]: expected a str"),
        ("x.npz", {"obj": np.array([{}], dtype=object)}, "would need pickling"),
    ],
)
def test_save_stats_bad_input(tmp_path, path, meta, match):
    with pytest.raises(ValueError, match=match):
        save_stats(tmp_path / path, np.zeros(2), np.eye(2), meta)
    assert not any(tmp_path.iterdir())


def test_reexports():
    assert metrics.Stats._fields == ("mu", "sigma", "meta")
