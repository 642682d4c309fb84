"""The value of tCURLoRA's update, against references written here: ΔW of a group, the weights of every adapted Linear
of a UNETR, the gradients that reach U and the input, the slices selected, and an exact unmerge.

Everything in float64 with U random (not at its init), so that a wrong core, a wrong slice order or a wrong
transform length shows as a difference far above rounding.
"""
from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import UNETR
from torch import nn
from torch.func import functional_call

from TCURLoRALib.tcur import TCURGroup, TCURLoRAConfig, TCURLoRAModel, select_slices, slice_scores, t_product
from tensor_reference import naive_delta, random

HIDDEN, MLP, LAYERS, IMG = 24, 40, 12, 32


@pytest.mark.parametrize("n3", [3, 4, 7, 12])
@pytest.mark.parametrize("rank", [2, 3, 5])
@pytest.mark.parametrize("init", ["pinv", "zero"])
def test_delta_weight_is_c_times_u_minus_u0_times_r(n3: int, rank: int, init: str) -> None:
    weight = random(9, 7, n3, seed=n3)  # n1 != n2, so that a transposed factor cannot pass
    group = TCURGroup.from_weight(weight, rank, init=init)
    with torch.no_grad():
        group.u.copy_(random(rank, rank, n3, seed=100 + rank))
    core = group.u.detach() - group.u_init
    expected = naive_delta(weight, group.rows, group.cols, core)
    torch.testing.assert_close(group.delta_weight().detach(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        group.delta_weight().detach(), t_product(t_product(group.c, core), group.r), rtol=1e-10, atol=1e-10
    )
    # An explicit core (what unmerge passes) is used instead of U.
    other = random(rank, rank, n3, seed=7)
    torch.testing.assert_close(
        group.delta_weight(other), naive_delta(weight, group.rows, group.cols, other - group.u_init), rtol=1e-10, atol=1e-10
    )


def test_rows_are_scored_on_the_chosen_columns_only() -> None:
    """Constant tubes (Ŵ_0 = n3 A, the other Fourier slices 0), so scores are column/row norms of A times n3.

    Columns 1 and 3 have the largest norms. On those columns rows 0 and 2 are largest; over all columns row 4
    (large only outside J) beats row 0: the two rules give rows [0, 2] and [2, 4].
    """
    a = torch.full((5, 5), 0.1, dtype=torch.float64)
    a[0, 1], a[0, 3] = 10.0, 8.0
    a[2, 1], a[2, 3] = 9.0, 10.0
    a[4, 0] = a[4, 2] = a[4, 4] = 8.0
    weight = a[:, :, None].expand(5, 5, 3).clone()
    rows, cols = select_slices(weight, rank=2)
    assert cols.tolist() == [1, 3]
    assert rows.tolist() == [0, 2]
    _, rows_on_all_columns = slice_scores(weight)
    assert torch.topk(rows_on_all_columns, 2).indices.sort().values.tolist() == [2, 4]  # the other rule's answer


def test_row_score_is_sum_of_fourier_slice_norms_on_the_chosen_columns() -> None:
    weight = random(6, 5, 4, seed=3)
    cols = torch.tensor([1, 4])
    spectrum = torch.fft.fft(weight, dim=-1)
    expected = torch.stack([sum(torch.linalg.vector_norm(spectrum[i, cols, k]) for k in range(4)) for i in range(6)])
    torch.testing.assert_close(slice_scores(weight, cols)[1], expected)


# ------------------------------------------------------------------------------------------ a UNETR, slice by slice


def tiny_unetr(seed: int = 0) -> UNETR:
    torch.manual_seed(seed)
    model = UNETR(1, 2, (IMG, IMG, IMG), feature_size=4, hidden_size=HIDDEN, mlp_dim=MLP, num_heads=2)
    return model.double().eval()


def group_tensors(base: nn.Module) -> dict[str, torch.Tensor]:
    """The paper's group tensors, stacked here slice by slice: q_l, k_l, v_l, out_l; linear1_l; linear2_l."""
    attention, up, down = [], [], []
    for block in base.vit.blocks:
        q, k, v = block.attn.qkv.weight.detach().split(HIDDEN, dim=0)
        attention += [q, k, v, block.attn.out_proj.weight.detach()]
        up.append(block.mlp.linear1.weight.detach())
        down.append(block.mlp.linear2.weight.detach())
    return {"attention": torch.stack(attention, -1), "mlp_up": torch.stack(up, -1), "mlp_down": torch.stack(down, -1)}


def adapted_weights(base: nn.Module, model: TCURLoRAModel) -> dict[str, torch.Tensor]:
    """``path.weight -> W + ΔW`` for every adapted Linear, ΔW by block-circulant products from ``base``'s weights and
    the model's ``I``, ``J``, ``U0`` and ``U`` (differentiable in ``U``)."""
    weights = {}
    for name, tensor in group_tensors(base).items():
        group = model.groups[name]
        delta = naive_delta(tensor, group.rows, group.cols, group.u - group.u_init)
        for layer in range(LAYERS):
            prefix = f"vit.blocks.{layer}"
            if name == "attention":
                qkv = torch.cat([delta[:, :, 4 * layer + j] for j in range(3)], dim=0)
                weights[f"{prefix}.attn.qkv.weight"] = base.get_submodule(f"{prefix}.attn.qkv").weight + qkv
                out = delta[:, :, 4 * layer + 3]
                weights[f"{prefix}.attn.out_proj.weight"] = base.get_submodule(f"{prefix}.attn.out_proj").weight + out
            else:
                path = f"{prefix}.mlp.{'linear1' if name == 'mlp_up' else 'linear2'}"
                weights[f"{path}.weight"] = base.get_submodule(path).weight + delta[:, :, layer]
    return weights


def adapted_pair(rank: int = 3) -> tuple[nn.Module, TCURLoRAModel]:
    """A frozen reference copy of a tiny float64 UNETR and the same UNETR adapted, with U random on every group."""
    reference = tiny_unetr()
    model = TCURLoRAModel(copy.deepcopy(reference), TCURLoRAConfig(rank=rank))
    reference.requires_grad_(False)
    model.requires_grad_(False)
    with torch.no_grad():
        for index, group in enumerate(model.groups.values()):
            group.u.copy_(group.u_init + 0.3 * random(*group.u.shape, seed=20 + index))
    return reference, model


def image(seed: int = 5) -> torch.Tensor:
    return random(2, 1, IMG, IMG, IMG, seed=seed)


def test_every_adapted_linear_gets_its_slices_of_the_update() -> None:
    """Merged weights equal ``W + ΔW`` with ΔW cut per Linear as the groups define it (qkv rows q, k, v)."""
    reference, model = adapted_pair()
    expected = adapted_weights(reference, model)
    model.merge()
    for path, weight in expected.items():
        merged = model.base.get_submodule(path.removesuffix(".weight")).base_layer.weight
        torch.testing.assert_close(merged, weight, rtol=1e-10, atol=1e-10, msg=path)


@pytest.mark.parametrize("route", ["fft", "bcirc", "factored", "auto"])
def test_output_and_gradients_match_the_reference_weights(route: str) -> None:
    """Forward and backward of the unmerged adapter, on each route, against a plain UNETR run with the reference
    weights: the output, the gradient of every U and the gradient of the input."""
    reference, model = adapted_pair()
    model.set_route(route)
    for group in model.groups.values():
        group.u.requires_grad_(True)
    x_model = image().requires_grad_()
    x_reference = image().requires_grad_()
    output = model(x_model)
    expected = functional_call(reference, adapted_weights(reference, model), (x_reference,))
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-9)
    upstream = random(*output.shape, seed=9)
    grads = torch.autograd.grad((output * upstream).sum(), [x_model, *[g.u for g in model.groups.values()]])
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x_reference, *[g.u for g in model.groups.values()]])
    for name, got, want in zip(["input", *model.groups], grads, expected_grads):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=name)


def test_unmerge_subtracts_what_merge_added_even_after_u_changed() -> None:
    reference, model = adapted_pair()
    x = image()
    with torch.no_grad():
        unmerged = model(x)
        model.merge()
        torch.testing.assert_close(model(x), unmerged, rtol=1e-10, atol=1e-10)
        for group in model.groups.values():
            group.u.add_(random(*group.u.shape, seed=11))
        model.unmerge()
    restored = {name.replace(".base_layer", ""): weight for name, weight in model.base.vit.named_parameters()}
    for name, weight in reference.vit.named_parameters():
        torch.testing.assert_close(restored[name], weight, rtol=0, atol=1e-12, msg=name)
