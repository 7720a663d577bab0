"""The torch path of the matching correlation, run on device "cpu": the same correlations
(to 1e-6) and the same partners as the numpy path, dead features included."""

import itertools
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from saeuniv.core.matching import CorrelationAccumulator, correlation, topk_correlation

# "cpu" everywhere; benchmarks/gpu_check.sh runs them again with SAEUNIV_TEST_DEVICE=cuda
DEVICE = os.environ.get("SAEUNIV_TEST_DEVICE", "cpu")


@pytest.fixture
def codes():
    """Continuous random codes (no near-ties) with a never-firing A feature (4) and a
    constant B feature (7): both dead."""
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, (400, 14)) * (rng.random((400, 14)) < 0.3)
    y = rng.exponential(1.0, (400, 11)) * (rng.random((400, 11)) < 0.3)
    x[:, 4], y[:, 7] = 0.0, 2.5
    return sp.csr_array(x), sp.csr_array(y)


def chunks(x, bounds):
    return [x[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def test_correlation_on_device_equals_numpy_with_dead_features(codes):
    a, b = codes
    ref = correlation(a, b, np.float64)
    got = correlation(a, b, np.float64, device=DEVICE)
    assert got.dtype == np.float64 and got.shape == (14, 11)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got[4]).all() and np.isnan(got[:, 7]).all()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_correlation_on_device_streamed_float32_codes_and_output(codes):
    a, b = (x.astype(np.float32) for x in codes)
    bounds = [0, 1, 90, 90, 333, 400]  # a 1-row and an empty chunk
    ref = correlation(a, b)
    got = correlation(chunks(a, bounds), chunks(b, bounds), device=DEVICE)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_accumulator_on_device_small_slabs_and_nondestructive_result(codes):
    a, b = codes
    acc = CorrelationAccumulator(block_bytes=8 * 11 * 3, device=DEVICE)  # 3-row slabs
    acc.update(a[:150], b[:150])
    first = acc.result(np.float64)
    np.testing.assert_allclose(first, correlation(a[:150], b[:150], np.float64), atol=1e-6)
    acc.update(a[150:], b[150:])
    assert acc.n_tokens == 400 and acc.n_chunks == 2
    np.testing.assert_allclose(acc.result(np.float64, release=True),
                               correlation(a, b, np.float64), atol=1e-6)
    with pytest.raises(ValueError, match="release"):
        acc.result()


@pytest.mark.parametrize("k", [1, 3])
# blocks of 1 x 8 (B split in two, 28 blocks, 1-token slabs: on fewer tokens, for time),
# of 2 x 11 (7 blocks), one block
@pytest.mark.parametrize(("max_bytes", "n_tokens"), [(8 * 8, 100), (8 * 2 * 11, 400),
                                                     (10**6, 400)])
def test_topk_on_device_equals_numpy(codes, k, max_bytes, n_tokens):
    a, b = (x[:n_tokens] for x in codes)
    ref = topk_correlation(a, b, k, max_bytes, np.float64)
    got = topk_correlation(a, b, k, max_bytes, np.float64, device=DEVICE)
    for side in ("a", "b"):
        np.testing.assert_array_equal(getattr(got, f"{side}_partner"),
                                      getattr(ref, f"{side}_partner"))
        np.testing.assert_allclose(getattr(got, f"{side}_corr"), getattr(ref, f"{side}_corr"),
                                   atol=1e-6, rtol=0)  # NaN where ref is NaN
    assert (got.a_partner[4] == -1).all() and (got.b_partner[7] == -1).all()
    assert 7 not in got.a_partner and 4 not in got.b_partner


def test_topk_on_device_ties_go_to_lowest_index():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    a = sp.csr_array(x)
    b = sp.csr_array(np.c_[x[:, 0], x[:, 0], x[:, 1]])  # B 0 and 1 are the same feature
    top = topk_correlation(a, b, k=1, max_bytes=8, device=DEVICE)
    assert top.a_partner[:, 0].tolist() == [0, 2]  # A 0 ties on B 0 and 1: the lower
    assert top.b_partner[:, 0].tolist() == [0, 0, 1]


def test_topk_on_device_pads_when_k_exceeds_live_partners(codes):
    a, b = codes
    top = topk_correlation(a, b, k=12, device=DEVICE)
    assert (top.a_partner[0, 10:] == -1).all() and np.isnan(top.a_corr[0, 10:]).all()
    assert (top.a_partner[0, :10] >= 0).all()


@pytest.mark.parametrize("call", [
    lambda a, b, d: correlation(a, b, device=d),
    lambda a, b, d: CorrelationAccumulator(device=d),
    lambda a, b, d: topk_correlation(a, b, device=d),
])
def test_bad_devices_are_refused(codes, call):
    with pytest.raises(ValueError, match=r"device 'tpu0' is not a torch device"):
        call(*codes, "tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' was asked for but no GPU"):
            call(*codes, "cuda")
