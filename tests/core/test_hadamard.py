"""Hadamard constructions: every order the models need is a ±1 matrix with H Hᵀ = n I (checked
exactly in integer-valued float64), the randomized and block-diagonal rotations are orthogonal,
and orders with no construction are refused by name."""

import numpy as np
import pytest

from jaxquant.core import hadamard as had

# powers of two, Paley I (12, 20, 44), Paley II (28, 36), and the products models need:
# SmolLM2 576 (hidden) and 1536 (MLP), Qwen2-0.5B 896 and 4864, Llama group sizes 64/128
ORDERS = [1, 2, 4, 8, 12, 20, 28, 36, 44, 64, 128, 576, 896, 1536, 4864]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_is_pm1_and_orthogonal(n):
    H = had.hadamard(n)
    assert H.shape == (n, n)
    assert set(np.unique(H).tolist()) <= {-1, 1}
    Hf = H.astype(np.float64)  # integer-valued: the product is exact
    np.testing.assert_array_equal(Hf @ Hf.T, n * np.eye(n))


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 43])
def test_paley1_orders(q):
    H = had.paley1(q).astype(np.float64)
    np.testing.assert_array_equal(H @ H.T, (q + 1) * np.eye(q + 1))


@pytest.mark.parametrize("q", [5, 13, 17, 29, 37])
def test_paley2_orders(q):
    H = had.paley2(q).astype(np.float64)
    n = 2 * (q + 1)
    np.testing.assert_array_equal(H @ H.T, n * np.eye(n))


def test_rotations_are_orthogonal_and_seeded():
    for n in (576, 128):
        Q = had.random_hadamard(n, seed=3)
        np.testing.assert_allclose(Q @ Q.T, np.eye(n), atol=1e-12)
        assert not np.array_equal(Q, had.random_hadamard(n, seed=4))
    B = had.block_hadamard(576, 64, seed=1)
    np.testing.assert_allclose(B @ B.T, np.eye(576), atol=1e-12)
    # block-diagonal: nothing outside the 64 x 64 diagonal blocks
    mask = np.kron(np.eye(9), np.ones((64, 64))) == 0
    assert np.all(B[mask] == 0)


def test_unsupported_orders_are_refused():
    for n in (3, 6, 10, 172):  # 172: no Paley factor (171 and 85 are not prime)
        with pytest.raises(ValueError, match=f"order {n}"):
            had.hadamard(n)
    with pytest.raises(ValueError, match="block 40 must divide the order 576"):
        had.block_hadamard(576, 40)
    with pytest.raises(ValueError, match="prime q = 3 mod 4"):
        had.paley1(13)
