"""t-product against an independent block-circulant reference, and its algebraic identities."""
from __future__ import annotations

import pytest
import torch

from TCURLoRALib.tcur import t_identity, t_pinv, t_product, t_transpose
from tensor_reference import bcirc, naive_t_product, random


@pytest.mark.parametrize("n3", [1, 4, 5, 12])
def test_t_product_matches_block_circulant_reference(n3: int) -> None:
    a, b = random(3, 4, n3, seed=1), random(4, 2, n3, seed=2)
    torch.testing.assert_close(t_product(a, b), naive_t_product(a, b), rtol=1e-12, atol=1e-12)


def test_t_product_is_batched_and_broadcasts() -> None:
    a, b = random(2, 3, 5, 4, 6), random(4, 2, 6, seed=3)
    product = t_product(a, b)
    assert product.shape == (2, 3, 5, 2, 6)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(product[i, j], naive_t_product(a[i, j], b), rtol=1e-12, atol=1e-12)


def test_t_product_is_associative() -> None:
    a, b, c = random(3, 4, 6, seed=1), random(4, 5, 6, seed=2), random(5, 2, 6, seed=3)
    torch.testing.assert_close(t_product(t_product(a, b), c), t_product(a, t_product(b, c)))


@pytest.mark.parametrize("n3", [3, 8])
def test_identity_is_neutral(n3: int) -> None:
    a = random(4, 5, n3)
    torch.testing.assert_close(t_product(a, t_identity(5, n3, dtype=torch.float64)), a)
    torch.testing.assert_close(t_product(t_identity(4, n3, dtype=torch.float64), a), a)


@pytest.mark.parametrize("n3", [5, 6])
def test_transpose_reverses_products(n3: int) -> None:
    a, b = random(3, 4, n3, seed=1), random(4, 2, n3, seed=2)
    torch.testing.assert_close(t_transpose(t_product(a, b)), t_product(t_transpose(b), t_transpose(a)))
    # The t-transpose is the transpose of the block-circulant matrix.
    torch.testing.assert_close(bcirc(t_transpose(a)), bcirc(a).T)


@pytest.mark.parametrize("shape", [(5, 3, 4), (3, 5, 7), (4, 4, 6)])
def test_pinv_meets_moore_penrose_conditions(shape: tuple[int, int, int]) -> None:
    a = random(*shape)
    a_pinv = t_pinv(a)
    assert a_pinv.shape == (shape[1], shape[0], shape[2])
    torch.testing.assert_close(t_product(t_product(a, a_pinv), a), a)
    torch.testing.assert_close(t_product(t_product(a_pinv, a), a_pinv), a_pinv)
    left, right = t_product(a, a_pinv), t_product(a_pinv, a)
    torch.testing.assert_close(t_transpose(left), left)
    torch.testing.assert_close(t_transpose(right), right)


def test_pinv_of_invertible_tensor_is_its_inverse() -> None:
    a = random(4, 4, 5) + 4 * t_identity(4, 5, dtype=torch.float64)
    torch.testing.assert_close(t_product(a, t_pinv(a)), t_identity(4, 5, dtype=torch.float64))


def test_t_product_is_differentiable() -> None:
    a = random(3, 2, 5).requires_grad_()
    b = random(2, 3, 5, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(t_product, (a, b))


def test_shape_errors_name_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"got a \(3, 4, 5\) and b \(3, 2, 5\)"):
        t_product(random(3, 4, 5), random(3, 2, 5))
    with pytest.raises(ValueError, match=r"got a \(3, 4, 5\) and b \(4, 2, 6\)"):
        t_product(random(3, 4, 5), random(4, 2, 6))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., n1, n2, n3\), got shape \(3, 4\)"):
        t_pinv(random(3, 4))
