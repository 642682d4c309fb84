"""Tensor CUR: exact on tensors of low tubal rank, better with rank, selection rules."""
from __future__ import annotations

import pytest
import torch

from TCURLoRALib.tcur import select_slices, slice_scores, t_product, tensor_cur


def low_tubal_rank(n1: int, n2: int, n3: int, rank: int, seed: int = 0) -> torch.Tensor:
    """A real tensor every Fourier slice of which has rank ``rank``: the t-product of n1 x r and r x n2 factors."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(n1, rank, n3, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, n2, n3, generator=generator, dtype=torch.float64)
    return t_product(left, right)


def relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(approximation - reference) / torch.linalg.vector_norm(reference))


@pytest.mark.parametrize("n3", [3, 8])
@pytest.mark.parametrize("rule", ["topk", "inverse_sampling"])
def test_reconstructs_low_tubal_rank_tensor_exactly(n3: int, rule: str) -> None:
    weight = low_tubal_rank(20, 16, n3, rank=4)
    cur = tensor_cur(weight, rank=4, rule=rule, seed=3)
    assert cur.c.shape == (20, 4, n3) and cur.r.shape == (4, 16, n3) and cur.core.shape == (4, 4, n3)
    assert relative_error(cur.reconstruct(), weight) < 1e-9


def test_rank_below_tubal_rank_is_not_exact() -> None:
    weight = low_tubal_rank(20, 16, 4, rank=6)
    assert relative_error(tensor_cur(weight, rank=3).reconstruct(), weight) > 1e-2


def test_error_falls_as_rank_grows() -> None:
    generator = torch.Generator().manual_seed(1)
    # Decaying spectrum, so that the error of a random tensor falls steadily with the rank.
    weight = sum(low_tubal_rank(24, 24, 5, rank=1, seed=k) * 0.6**k for k in range(24))
    weight = weight + 1e-3 * torch.randn(24, 24, 5, generator=generator, dtype=torch.float64)
    errors = [relative_error(tensor_cur(weight, rank=r).reconstruct(), weight) for r in (2, 4, 8, 16, 24)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-9


def test_topk_picks_the_columns_of_largest_fourier_norm() -> None:
    weight = torch.randn(6, 10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight[:, 7] *= 50
    weight[:, 2] *= 30
    weight[4, :] *= 40
    rows, cols = select_slices(weight, rank=2)
    assert cols.tolist() == [2, 7]
    assert 4 in rows.tolist()


def test_column_score_is_sum_of_fourier_slice_norms() -> None:
    weight = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spectrum = torch.fft.fft(weight, dim=-1)
    expected = torch.stack([sum(torch.linalg.vector_norm(spectrum[:, j, k]) for k in range(6)) for j in range(3)])
    column_scores, _ = slice_scores(weight)
    torch.testing.assert_close(column_scores, expected)


def test_selection_is_deterministic_and_seeded() -> None:
    weight = torch.randn(30, 30, 4, generator=torch.Generator().manual_seed(0))
    first, second = select_slices(weight, 5), select_slices(weight, 5)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    sampled = [select_slices(weight, 5, rule="inverse_sampling", seed=s) for s in (1, 1, 2)]
    assert torch.equal(sampled[0][1], sampled[1][1])
    assert not torch.equal(sampled[0][1], sampled[2][1]) or not torch.equal(sampled[0][0], sampled[2][0])
    for rows, cols in sampled:
        assert rows.unique().numel() == 5 and cols.unique().numel() == 5


def test_inverse_sampling_prefers_small_slices() -> None:
    weight = torch.ones(40, 40, 3)
    weight[:, 20:] *= 1000  # columns 20.. carry a thousand times the norm: they should almost never be drawn
    picks = torch.cat([select_slices(weight, 4, rule="inverse_sampling", seed=s)[1] for s in range(25)])
    assert (picks < 20).float().mean() > 0.95


def test_bad_arguments_are_named() -> None:
    weight = torch.randn(6, 4, 3)
    with pytest.raises(ValueError, match=r"rank r=5 must be between 1 and min\(n1, n2\)=4"):
        tensor_cur(weight, 5)
    with pytest.raises(ValueError, match=r"rank r=0"):
        tensor_cur(weight, 0)
    with pytest.raises(ValueError, match=r"unknown selection rule 'random'"):
        tensor_cur(weight, 2, rule="random")
    with pytest.raises(ValueError, match=r"third-order tensor n1 x n2 x n3, got shape \(6, 4\)"):
        tensor_cur(weight[..., 0], 2)
