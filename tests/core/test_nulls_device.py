"""The permutation nulls on a torch device ("cpu" here) against the numpy path: same draws,
scores within the stated tolerance, the same observed score, p and tau; bad devices refused."""

import os

import numpy as np
import pytest
import torch

from saeuniv.core import metrics
from saeuniv.core.metrics import nulls, representational

# "cpu" everywhere; benchmarks/gpu_check.sh runs them again with SAEUNIV_TEST_DEVICE=cuda
DEVICE = os.environ.get("SAEUNIV_TEST_DEVICE", "cpu")

TOL = 1e-6  # permutation_null's documented agreement of device and numpy draws

CASES = [
    ("svcca", {"k": 6}),
    ("svcca", {"variance": 0.9}),
    ("cka", {}),
    ("cka", {"debiased": True}),
    ("rsa", {}),
    ("rsa", {"inner": "cosine", "outer": "pearson"}),
    ("mutual_knn", {"k": 4}),
    ("procrustes", {}),
]


def paired(n=48, d_a=12, d_b=18, seed=0):
    """Two sides sharing a few directions, so the observed score stands out of its null."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    A = z @ rng.standard_normal((4, d_a)) + rng.standard_normal((n, d_a))
    B = z @ rng.standard_normal((4, d_b)) + rng.standard_normal((n, d_b))
    return A, B


def both(name, A, B, seed=5, n_perm=40, **kwargs):
    return (metrics.permutation_null(name, A, B, n_perm=n_perm, seed=seed, **kwargs),
            metrics.permutation_null(name, A, B, n_perm=n_perm, seed=seed, device=DEVICE,
                                     **kwargs))


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_device_null_matches_numpy(name, kwargs):
    A, B = paired()
    ref, dev = both(name, A, B, **kwargs)
    assert ref.null_sd > 0  # the draws vary, so agreeing draw by draw means something
    assert dev.observed == ref.observed
    np.testing.assert_allclose(dev.null, ref.null, rtol=0, atol=TOL)
    assert dev.p == ref.p and dev.n_perm == ref.n_perm and dev.seed == ref.seed
    assert abs(dev.tau - ref.tau) <= TOL


def test_mutual_knn_counts_are_exact():
    ref, dev = both("mutual_knn", *paired(), k=5)
    np.testing.assert_array_equal(dev.null, ref.null)


def test_cka_with_more_dimensions_than_pairs_uses_the_grams_on_the_device():
    A, B = paired(n=9, d_a=20, d_b=30)  # n^2 <= d_a d_b: the Gram branch
    for debiased in (False, True):
        ref, dev = both("cka", A, B, debiased=debiased)
        np.testing.assert_allclose(dev.null, ref.null, rtol=0, atol=TOL)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_many_small_batches_give_the_same_draws(monkeypatch, name, kwargs):
    A, B = paired()
    whole = metrics.permutation_null(name, A, B, n_perm=30, seed=2, device=DEVICE, **kwargs)
    # one draw per batch, and RSA's rows a few at a time
    monkeypatch.setattr(nulls, "DEVICE_BLOCK_BYTES", 1)
    monkeypatch.setattr(representational, "DEVICE_BLOCK_BYTES", 8 * 48 * 5)
    split = metrics.permutation_null(name, A, B, n_perm=30, seed=2, device=DEVICE, **kwargs)
    np.testing.assert_allclose(split.null, whole.null, rtol=0, atol=1e-12)


def test_the_seed_picks_the_permutations():
    A, B = paired()
    one = metrics.permutation_null("svcca", A, B, n_perm=20, seed=1, device=DEVICE, k=6)
    again = metrics.permutation_null("svcca", A, B, n_perm=20, seed=1, device=DEVICE, k=6)
    other = metrics.permutation_null("svcca", A, B, n_perm=20, seed=2, device=DEVICE, k=6)
    np.testing.assert_array_equal(one.null, again.null)
    assert not np.allclose(one.null, other.null)


@pytest.mark.parametrize("metric", ["pwcca", "callable", "kendall"])
def test_metrics_without_a_device_path_run_in_numpy(metric):
    A, B = paired(n=20)
    name, kwargs = {"pwcca": ("pwcca", {}), "callable": (metrics.cka, {}),
                    "kendall": ("rsa", {"outer": "kendall"})}[metric]
    ref, dev = both(name, A, B, n_perm=10, **kwargs)
    np.testing.assert_array_equal(dev.null, ref.null)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", 3.5])
def test_a_bad_device_is_refused(device):
    A, B = paired()
    with pytest.raises(ValueError, match="not a torch device"):
        metrics.permutation_null("svcca", A, B, n_perm=5, device=device, k=6)


def test_a_gpu_this_process_cannot_see_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    A, B = paired()
    for name in ("svcca", "pwcca"):  # refused also where the null would run in numpy
        with pytest.raises(ValueError, match="no GPU is visible"):
            metrics.permutation_null(name, A, B, n_perm=5, device="cuda")


def test_the_fast_nulls_refuse_a_bad_device_themselves():
    A, B = paired()
    perms = [np.random.default_rng(0).permutation(len(A))]
    for null in (metrics.METRICS[m].null for m in metrics.METRICS
                 if metrics.METRICS[m].on_device):
        with pytest.raises(ValueError, match="not a torch device"):
            null(A, B, perms, device="tpu")
