"""The three routes of a group's update (dense by FFT, dense by block-circulant products, factored) give the same
outputs and gradients, and the count that chooses between them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from TCURLoRALib.tcur import TCURGroup
from TCURLoRALib.tcur.routes import BETA_BCIRC, BETA_FFT, GAMMA_SITE, ROUTES, choose_route, route_costs
from tensor_reference import naive_delta, random

SITES = [(0, 3), (3, 4), (4, 7), (2, 5)]


def group_with_random_u(n1: int, n2: int, n3: int, rank: int, seed: int = 0) -> tuple[TCURGroup, torch.Tensor]:
    weight = random(n1, n2, n3, seed=seed)
    group = TCURGroup.from_weight(weight, rank)
    with torch.no_grad():
        group.u.copy_(random(rank, rank, n3, seed=seed + 1))
    return group, weight


def site_output(group: TCURGroup, route: str, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``x ΔW_site^T`` by ``route``, as a Linear would add it."""
    if route == "factored":
        return group.update(x, start, stop)
    slices = group.delta_slices(route)
    return F.linear(x, slices[start:stop].reshape(-1, slices.shape[-1]))


@pytest.mark.parametrize("n3", [7, 8])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("route", ROUTES)
def test_site_outputs_and_gradients_equal_the_reference(n3: int, rank: int, route: str) -> None:
    group, weight = group_with_random_u(6, 5, n3, rank, seed=n3)
    for start, stop in SITES:
        x = random(2, 4, 5, seed=start + 10).requires_grad_()
        output = site_output(group, route, x, start, stop)
        delta = naive_delta(weight, group.rows, group.cols, group.u - group.u_init)
        expected = x @ torch.cat([delta[:, :, k] for k in range(start, stop)], dim=0).T
        assert output.shape == (2, 4, 6 * (stop - start))
        torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)
        upstream = random(*output.shape, seed=3)
        got = torch.autograd.grad((output * upstream).sum(), [x, group.u])
        want = torch.autograd.grad((expected * upstream).sum(), [x, group.u])
        for name, a, b in zip(("input", "U"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name}, site {start}..{stop}")


@pytest.mark.parametrize("n3", [1, 2, 3, 4])
def test_short_tubes(n3: int) -> None:
    """Tube lengths where the real Fourier blocks of the factored route degenerate (no pair, Nyquist only, padding)."""
    group, weight = group_with_random_u(5, 4, n3, 2, seed=n3)
    delta = naive_delta(weight, group.rows, group.cols, group.u.detach() - group.u_init)
    x = random(3, 4, seed=1)
    for start, stop in ((0, n3), (n3 - 1, n3)):
        expected = x @ torch.cat([delta[:, :, k] for k in range(start, stop)], dim=0).T
        for route in ROUTES:
            torch.testing.assert_close(site_output(group, route, x, start, stop).detach(), expected, rtol=1e-10,
                                       atol=1e-10, msg=f"{route}, slices {start}..{stop}")


def test_bcirc_slices_equal_the_fft_update() -> None:
    group, _ = group_with_random_u(9, 4, 12, 3)
    torch.testing.assert_close(group.delta_slices("bcirc"), group.delta_weight().permute(2, 0, 1))
    with pytest.raises(ValueError, match="route 'factored' builds no dense update"):
        group.delta_slices("factored")


def test_routes_survive_a_cast() -> None:
    group, _ = group_with_random_u(6, 5, 7, 2)
    x = random(3, 5, seed=4)
    expected = {route: site_output(group, route, x, 0, 3).detach() for route in ROUTES}
    group.float()
    for route in ROUTES:
        torch.testing.assert_close(site_output(group, route, x.float(), 0, 3).double(), expected[route], rtol=1e-4, atol=1e-5)


def test_set_route_is_checked_and_auto_follows_the_count() -> None:
    from test_update_value import adapted_pair

    _, model = adapted_pair()
    with pytest.raises(ValueError, match=r"unknown route 'dense'"):
        model.set_route("dense")
    with pytest.raises(ValueError, match=r"adapts no group\(s\) \['mlp'\]"):
        model.set_route("fft", ["mlp"])
    model.set_route("factored")
    model.set_route("bcirc", ["attention"])
    assert [model.route(name, 16) for name in model.groups] == ["bcirc", "factored", "factored"]
    model.set_route("auto")
    group = model.groups["mlp_up"]
    counts = [site.stop - site.start for site in model.sites["mlp_up"]]
    for tokens in (1, 10**6):
        expected = choose_route(group.shape, group.rows.numel(), counts, tokens, backward=False)
        assert model.route("mlp_up", tokens) == expected


def test_factored_route_builds_no_update_and_merged_forward_uses_the_base_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_update_value import adapted_pair, image

    _, model = adapted_pair()
    model.set_route("factored")
    monkeypatch.setattr(TCURGroup, "delta_weight", lambda *_: pytest.fail("the factored route built ΔW"))
    monkeypatch.setattr(TCURGroup, "delta_slices", lambda *_: pytest.fail("the factored route built ΔW"))
    with torch.no_grad():
        unmerged = model(image())
    monkeypatch.undo()
    model.merge()
    monkeypatch.setattr(TCURGroup, "update", lambda *_: pytest.fail("a merged adapter ran its update"))
    monkeypatch.setattr(TCURGroup, "delta_slices", lambda *_: pytest.fail("a merged adapter ran its update"))
    with torch.no_grad():
        torch.testing.assert_close(model(image()), unmerged, rtol=1e-10, atol=1e-10)


UNETR_B = {"attention": ((768, 768, 48), [3, 1] * 12), "mlp_up": ((3072, 768, 12), [1] * 12),
           "mlp_down": ((768, 3072, 12), [1] * 12)}
COMPACT = {"attention": ((192, 192, 48), [3, 1] * 12), "mlp_up": ((768, 192, 12), [1] * 12),
           "mlp_down": ((192, 768, 12), [1] * 12)}


@pytest.mark.parametrize("tokens", [216, 432])
def test_count_chooses_the_factored_route_for_unetr_b_training(tokens: int) -> None:
    for name, (shape, counts) in UNETR_B.items():
        assert choose_route(shape, 8, counts, tokens) == "factored", name


def test_count_is_the_documented_formula() -> None:
    """A hand-computed case: n1, n2, n3 = 4, 3, 2; r = 1 (q = 2); two sites of one slice; N = 5."""
    costs = route_costs((4, 3, 2), 1, [1, 1], 5)
    assert costs["fft"] == 5 * 24 + 2 * 4 * 2 * 1 * 3 * (4 + 1) + BETA_FFT * 24
    assert costs["bcirc"] == 5 * 24 + 2 * (1 * 2 * 24 + 1 * 4 * 3) + BETA_BCIRC * 24
    assert costs["factored"] == 2 * 5 * 2 * (3 * 2 + 2 * 1 * 4) + 2 * GAMMA_SITE
    forward = route_costs((4, 3, 2), 1, [1, 1], 5, backward=False)
    assert forward["fft"] == 4 * 2 * 1 * 3 * (4 + 1) + BETA_FFT * 12
    assert forward["factored"] == 2 * 5 * 2 * (3 + 4) + GAMMA_SITE
    without_input_grad = route_costs((4, 3, 2), 1, [1, 1], 5, input_grad=False)
    assert costs["factored"] - without_input_grad["factored"] == 2 * 5 * 2 * 3


def test_count_crosses_over_for_attention_and_not_for_unetr_b_mlp() -> None:
    shape, counts = UNETR_B["attention"]
    few, many = route_costs(shape, 8, counts, 216), route_costs(shape, 8, counts, 2160)
    assert many["fft"] - few["fft"] == pytest.approx(many["bcirc"] - few["bcirc"])  # the weight gradients only
    assert choose_route(shape, 8, counts, 100_000) != "factored"
    shape, counts = UNETR_B["mlp_up"]
    assert choose_route(shape, 8, counts, 100_000) == "factored"
    shape, counts = COMPACT["attention"]
    assert choose_route(shape, 8, counts, 32) == "factored"
    assert choose_route(shape, 8, counts, 216) == "fft"
    with pytest.raises(ValueError, match=r"site slice counts \[3, 1\] must sum to n3=48"):
        route_costs(shape, 8, [3, 1], 216)


def test_cached_index_and_phases_first_made_in_inference_mode_still_train() -> None:
    """Validation and segmentation run under torch.inference_mode; the t-product's cached index and Fourier phases
    they fill first must not be inference tensors, or the next training step fails (as a fresh torchrun process
    did: validation of step 0, then step 1)."""
    from TCURLoRALib.tcur.factored import _phases, mixing_matrices
    from TCURLoRALib.tcur.routes import circulant_index, delta_by_bcirc

    circulant_index.cache_clear()
    _phases.cache_clear()
    c, r = torch.randn(8, 5), torch.randn(6, 8)
    core = torch.randn(2, 2, 4, requires_grad=True)
    with torch.inference_mode():
        delta_by_bcirc(c, r, core.detach())
        mixing_matrices(core.detach())
    (delta_by_bcirc(c, r, core).sum() + mixing_matrices(core).sum()).backward()
    assert core.grad is not None and torch.isfinite(core.grad).all()
