"""tCURLoRA on a real MONAI UNETR: identity at init, U really trains, merge/unmerge, what trains, UNETR-B counts."""
from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import UNETR
from torch import nn

from synthetic import TINY_UNETR, tiny_unetr
from TCURLoRALib.tcur import GROUP_NAMES, TCURGroup, TCURLinear, TCURLoRAConfig, TCURLoRAModel, stack_group

IMG = TINY_UNETR["img_size"][0]


def sample(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 1, IMG, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def vit_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.base.vit.named_parameters()}


def train_steps(model: TCURLoRAModel, steps: int = 3, dtype: torch.dtype = torch.float32) -> None:
    """``steps`` Adam steps (lr 1e-2, no weight decay) of an MSE loss on a fixed batch, in ``dtype``."""
    model.mark_trainable()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = sample(2).to(dtype)
    target = torch.randn(2, 3, IMG, IMG, IMG, generator=torch.Generator().manual_seed(3)).to(dtype)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("init", ["pinv", "zero"])
def test_output_equals_base_at_init(init: str) -> None:
    base = tiny_unetr()
    x = sample()
    with torch.no_grad():
        expected = base(x)
        adapted = TCURLoRAModel(base, TCURLoRAConfig(rank=4, init=init))
        torch.testing.assert_close(adapted(x), expected, rtol=0, atol=1e-5)
    assert all(isinstance(base.get_submodule(site.path), TCURLinear) for sites in adapted.sites.values() for site in sites)


@pytest.mark.parametrize("init", ["pinv", "zero"])
def test_u_trains_and_base_vit_stays_frozen(init: str) -> None:
    model = TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=4, init=init))
    x = sample()
    with torch.no_grad():
        before_output = model(x)
    before_vit = vit_state(model)
    before_u = {name: group.u.detach().clone() for name, group in model.groups.items()}

    model.mark_trainable()
    model(x).square().mean().backward()
    for name, group in model.groups.items():
        assert group.u.grad is not None and group.u.grad.abs().sum() > 0, f"U of {name} received no gradient"
    model.zero_grad(set_to_none=True)

    train_steps(model)
    for name, group in model.groups.items():
        assert not torch.equal(group.u, before_u[name]), f"U of {name} did not change"
        assert group.delta_weight().abs().max() > 0, f"ΔW of {name} is still zero"
    for name, value in model.base.vit.named_parameters():
        assert value.grad is None, f"frozen ViT weight {name} received a gradient"
        assert torch.equal(value, before_vit[name]), f"frozen ViT weight {name} changed"
    with torch.no_grad():
        assert (model(x) - before_output).abs().max() > 1e-4


def test_both_inits_train_the_same_update(one_torch_thread) -> None:
    """ΔW = C * (U - U0) * R: its gradient with respect to U does not depend on U0, and Adam's steps depend only on
    the gradients, so "pinv" and "zero" follow the same ΔW (the few-shot benchmark's finding that train's default
    init rests on). Weight decay on U would break this (AdamW's default decay: 4-5 % apart here); train_adapter uses
    none.

    In float64, because float32 is too coarse to tell: U - U0 rounds differently for the two inits, and Adam turns
    a gradient's rounding into a step of its own (lr times the sign) where the gradient is small, so float32 runs
    were 1-2 % apart, as near to the decay's 4-5 % as to 0. In float64 they agree to 1e-14 (measured).
    """
    updates = {}
    for init in ("pinv", "zero"):
        # feature_size 4: the decoder's float64 convolutions, not the ViT, set this test's time.
        model = TCURLoRAModel(tiny_unetr(feature_size=4).double(), TCURLoRAConfig(rank=4, init=init))
        train_steps(model, steps=4, dtype=torch.float64)
        updates[init] = {name: group.delta_weight().detach() for name, group in model.groups.items()}
    for name, pinv_update in updates["pinv"].items():
        assert pinv_update.abs().max() > 1e-3, name
        assert (updates["zero"][name] - pinv_update).norm() < 1e-9 * pinv_update.norm(), name


def test_dtype_and_device_moves_keep_the_fourier_slices() -> None:
    model = TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=4))
    train_steps(model, steps=1)
    expected = {name: group.delta_weight().detach().double() for name, group in model.groups.items()}
    model.double().to("cpu")
    for name, group in model.groups.items():
        assert group.c_fourier.dtype == torch.complex128, name
        torch.testing.assert_close(group.delta_weight().detach(), expected[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(sample().double())).all()


def test_update_changes_output_through_vit_alone() -> None:
    """The output moves when only U moves: ΔW reaches the ViT's Linear layers."""
    model = TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=4))
    x = sample()
    with torch.no_grad():
        before = model(x)
        for group in model.groups.values():
            group.u.add_(0.05 * torch.randn_like(group.u))
        assert (model(x) - before).abs().max() > 1e-4


def test_delta_is_computed_once_per_group_and_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=4))
    model.set_route("fft")
    calls: list[int] = []
    original = TCURGroup.delta_weight
    monkeypatch.setattr(TCURGroup, "delta_weight", lambda self, u=None: calls.append(1) or original(self, u))
    with torch.no_grad():
        model(sample())
        assert len(calls) == len(GROUP_NAMES)
        model(sample())
    assert len(calls) == 2 * len(GROUP_NAMES)


def test_merge_matches_unmerged_and_unmerge_restores_base() -> None:
    model = TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=4))
    original_weights = {name: p.detach().clone() for name, p in model.base.vit.named_parameters()}
    train_steps(model)
    x = sample()
    with torch.no_grad():
        unmerged = model(x)
        model.merge()
        assert model.merged
        changed = [name for name, p in model.base.vit.named_parameters() if not torch.equal(p, original_weights[name])]
        assert any("qkv" in name for name in changed) and any("linear1" in name for name in changed)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
        model.unmerge()
        assert not model.merged
        for name, p in model.base.vit.named_parameters():
            torch.testing.assert_close(p, original_weights[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)


def test_merge_refuses_non_finite_update_and_leaves_base_alone() -> None:
    model = TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=4))
    weights = vit_state(model)
    with torch.no_grad():
        model.groups["mlp_up"].u[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="group 'mlp_up' holds non-finite values"):
        model.merge()
    assert not model.merged
    assert all(torch.equal(p, weights[name]) for name, p in model.base.vit.named_parameters())


def test_delta_weight_gradcheck() -> None:
    weight = torch.randn(7, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    group = TCURGroup.from_weight(weight, rank=3)
    u = group.u.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda core: group.delta_weight(core), (u,))


def test_pinv_init_stacks_the_paper_tensors() -> None:
    base = tiny_unetr()
    model = TCURLoRAModel(copy.deepcopy(base), TCURLoRAConfig(rank=4))
    layers, hidden, mlp = 12, 48, 96
    assert model.groups["attention"].shape == (hidden, hidden, 4 * layers)
    assert model.groups["mlp_up"].shape == (mlp, hidden, layers)
    assert model.groups["mlp_down"].shape == (hidden, mlp, layers)
    # Slice order q_0, k_0, v_0, out_0, q_1, ...: check two slices against the base weights.
    attention = stack_group(model.base, model.sites["attention"])
    torch.testing.assert_close(attention[:, :, 5], base.vit.blocks[1].attn.qkv.weight[hidden : 2 * hidden])
    torch.testing.assert_close(attention[:, :, 7], base.vit.blocks[1].attn.out_proj.weight)
    group = model.groups["attention"]
    torch.testing.assert_close(group.c, attention[:, group.cols, :])


def test_mark_trainable_selects_u_decoder_and_head() -> None:
    model = TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=4, groups=("attention",)))
    counts = model.mark_trainable(train_head=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(n.startswith(("groups.", "base.decoder5", "base.decoder4", "base.decoder3", "base.decoder2")) for n in trainable)
    assert "groups.attention.u" in trainable
    assert counts.u == 4 * 4 * 48
    assert counts.head == 0
    with_head = model.mark_trainable(train_head=True)
    assert with_head.head == sum(p.numel() for p in model.base.out.parameters()) > 0
    assert with_head.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_bad_models_and_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="no ViT blocks at 'vit.blocks'"):
        TCURLoRAModel(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"unknown weight group\(s\) \['mlp'\]"):
        TCURLoRAConfig(groups=("attention", "mlp"))
    with pytest.raises(ValueError, match=r"rank r=49 must be between 1 and min\(n1, n2\)=48"):
        TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=49))
    with pytest.raises(ValueError, match="unknown init 'random'"):
        TCURLoRAConfig(init="random")
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        TCURLoRAConfig(rank=0)
    broken = tiny_unetr()
    del broken.vit.blocks[3].mlp.linear2
    with pytest.raises(ValueError, match="ViT block 3 has no Linear layer 'mlp.linear2'"):
        TCURLoRAModel(broken)


def test_unetr_b_paper_configuration_counts() -> None:
    """The paper's UNETR-B at r = 8 with all three groups: 2,683,136 trainable, of which U is 4,608."""
    torch.manual_seed(0)
    base = UNETR(1, 2, (96, 96, 96), feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12)
    model = TCURLoRAModel(base, TCURLoRAConfig(rank=8))
    counts = model.mark_trainable(train_head=False)
    assert counts.u == 4_608
    assert counts.decoder == 2_678_528
    assert counts.trainable == 2_683_136
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_683_136
    assert model.groups["attention"].shape == (768, 768, 48)


def test_group_state_rebuilds_the_same_adapter_on_a_fresh_base() -> None:
    trained = TCURLoRAModel(tiny_unetr(), TCURLoRAConfig(rank=4, init="zero", groups=("attention", "mlp_down")))
    train_steps(trained)
    x = sample()
    rebuilt = TCURLoRAModel(tiny_unetr(), trained.config, group_state=trained.group_state())
    rebuilt.base.load_state_dict({k: v for k, v in trained.base.state_dict().items() if k.startswith("decoder")}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x), rtol=0, atol=1e-5)
    bad_state = trained.group_state()
    bad_state["attention"]["rows"] = torch.tensor([0, 1, 2, 480])
    with pytest.raises(ValueError, match=r"rows indices \[0, 1, 2, 480\] do not fit a group tensor of shape \(48, 48, 48\)"):
        TCURLoRAModel(tiny_unetr(), trained.config, group_state=bad_state)
    with pytest.raises(ValueError, match=r"no state for group 'mlp_down'"):
        TCURLoRAModel(tiny_unetr(), trained.config, group_state={"attention": trained.group_state()["attention"]})


def test_unload_gives_back_the_plain_base() -> None:
    base = tiny_unetr()
    x = sample()
    with torch.no_grad():
        expected = base(x)
        model = TCURLoRAModel(base, TCURLoRAConfig(rank=4))
        for group in model.groups.values():
            group.u.add_(0.1)
        model.merge()
        unloaded = model.unload()
        assert not any(isinstance(m, TCURLinear) for m in unloaded.modules())
        assert isinstance(unloaded.vit.blocks[0].attn.qkv, nn.Linear)
        torch.testing.assert_close(unloaded(x), expected, rtol=0, atol=1e-5)
