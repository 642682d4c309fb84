"""Base-model files, adapter files on a base, switching adapters, and their errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synthetic import BASE_LABELS as LABELS
from synthetic import make_tiny_base, tiny_card_fields, tiny_unetr
from TCURLoRALib import files, tensorfiles
from TCURLoRALib.adapter import AdaptedUNETR, attach_head, read_adapter, save_adapter
from TCURLoRALib.basemodel import import_checkpoint, load_base, save_base
from TCURLoRALib.cards import AdapterCard, AdapterMismatchError, Label
from TCURLoRALib.tcur import TCURLoRAConfig, TCURLoRAModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def x_sample() -> torch.Tensor:
    return torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))


def make_adapter_file(base_path: Path, out: Path, labels: list[Label], seed: int = 0,
                      groups=("attention", "mlp_up")) -> AdapterCard:
    """Two optimiser steps on a random input (not ``train.train_adapter``): an adapter file whose expected output on
    :func:`x_sample` is saved beside it, for tests of the file format and of switching adapters."""
    base = load_base(base_path)
    head = labels != base.card.labels
    if head:
        attach_head(base.model, labels)
    model = TCURLoRAModel(base.model, TCURLoRAConfig(rank=4, groups=groups))
    model.train()
    model.mark_trainable(train_head=head)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(seed)
    for _ in range(2):
        optimizer.zero_grad()
        model(x_sample()).square().mean().backward()
        optimizer.step()
    model.eval()
    card = AdapterCard(name=out.stem, base_fingerprint=base.card.fingerprint, base_name=base.card.name, rank=4,
                       groups=list(groups), init="pinv", labels=labels,
                       training={"cases": 1, "steps": 2, "seconds": 0.1, "device": "cpu", "seed": seed})
    save_adapter(out, model, card, include_head=head)
    with torch.no_grad():
        torch.save(model(x_sample()), out.with_suffix(".expected.pt"))
    return card


@pytest.fixture()
def base_path(tmp_path: Path) -> Path:
    return make_tiny_base(tmp_path / "base.safetensors")


def test_base_round_trip_is_frozen_and_fingerprinted(base_path: Path) -> None:
    base = load_base(base_path)
    assert not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())
    assert base.card.fingerprint == tensorfiles.fingerprint({k: v for k, v in base.model.state_dict().items()})
    assert base.card.labels == LABELS


def test_edited_base_weights_are_refused(base_path: Path, tmp_path: Path) -> None:
    tensors, card = tensorfiles.load(base_path, "base")
    tensors["vit.norm.weight"] = tensors["vit.norm.weight"] + 1
    tensorfiles.save_atomic(tmp_path / "edited.safetensors", tensors, card, kind="base")
    with pytest.raises(files.TCURLoRAFileError, match="do not match the fingerprint of its card"):
        load_base(tmp_path / "edited.safetensors")


def test_import_monai_checkpoint_with_wrapper_and_module_prefix(tmp_path: Path) -> None:
    unetr = tiny_unetr(seed=3)
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in unetr.state_dict().items()}, "epoch": 7}
    torch.save(checkpoint, tmp_path / "model.pt")
    card = import_checkpoint(tmp_path / "model.pt", tiny_card_fields("imported"), tmp_path / "imported.safetensors")
    base = load_base(tmp_path / "imported.safetensors")
    assert base.card.fingerprint == card.fingerprint
    with torch.no_grad():
        torch.testing.assert_close(base.model(x_sample()), unetr(x_sample()))
    torch.save({"model": {"bogus.weight": torch.zeros(2)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"do not fit the UNETR of its card: missing \['decoder2"):
        import_checkpoint(tmp_path / "bad.pt", tiny_card_fields(), tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_adapter_switching_reproduces_training_outputs_without_reloading(base_path: Path, tmp_path: Path) -> None:
    same_labels = make_adapter_file(base_path, tmp_path / "a.safetensors", LABELS, seed=1)
    new_labels = [LABELS[0], Label(7, "hippocampus", (220, 180, 30))]
    make_adapter_file(base_path, tmp_path / "b.safetensors", new_labels, seed=2, groups=("mlp_down",))
    session = AdaptedUNETR(load_base(base_path))
    x = x_sample()
    with torch.no_grad():
        plain = session.model(x)
        assert session.set_adapter(tmp_path / "a.safetensors").name == same_labels.name
        torch.testing.assert_close(session.model(x), torch.load(tmp_path / "a.expected.pt"), rtol=0, atol=1e-4)
        session.set_adapter(tmp_path / "b.safetensors")
        assert session.labels == new_labels
        out_b = session.model(x)
        assert out_b.shape[1] == 2
        torch.testing.assert_close(out_b, torch.load(tmp_path / "b.expected.pt"), rtol=0, atol=1e-4)
        session.set_adapter(None)
        torch.testing.assert_close(session.model(x), plain, rtol=0, atol=1e-5)
        assert session.labels == LABELS


def test_adapter_for_another_base_is_refused_and_state_kept(base_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    make_tiny_base(other, seed=9, name="other base")
    make_adapter_file(other, tmp_path / "foreign.safetensors", LABELS)
    make_adapter_file(base_path, tmp_path / "mine.safetensors", LABELS)
    session = AdaptedUNETR(load_base(base_path))
    session.set_adapter(tmp_path / "mine.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"trained on base model 'other base' \(fingerprint [0-9a-f]{64}\), but the loaded base model is 'tiny'"):
        session.set_adapter(tmp_path / "foreign.safetensors")
    assert session.adapter_card is not None and session.adapter_card.name == "mine"


def test_truncated_or_tampered_adapter_is_refused(base_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    make_adapter_file(base_path, path, LABELS)
    base = load_base(base_path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(files.TCURLoRAFileError, match="truncated"):
        read_adapter(tmp_path / "cut.safetensors", base)
    tensors, card = tensorfiles.load(path, "adapter")
    del tensors["tcur.attention.u"]
    tensorfiles.save_atomic(tmp_path / "no_u.safetensors", tensors, card, kind="adapter")
    with pytest.raises(files.TCURLoRAFileError, match=r"declares groups \['attention', 'mlp_up'\] but holds tensors"):
        read_adapter(tmp_path / "no_u.safetensors", base)
    with pytest.raises(FileNotFoundError):
        read_adapter(tmp_path / "missing.safetensors", base)
    with pytest.raises(files.TCURLoRAFileError, match="is a TCURLoRA base file, but a TCURLoRA adapter file was expected"):
        read_adapter(base_path, base)


def test_half_precision_storage_loads_as_float32(tmp_path: Path) -> None:
    unetr = tiny_unetr(seed=0)
    save_base(tmp_path / "full.safetensors", unetr, tiny_card_fields())
    save_base(tmp_path / "half.safetensors", unetr, tiny_card_fields(), dtype=torch.float16)
    full, half = (tmp_path / "full.safetensors").stat().st_size, (tmp_path / "half.safetensors").stat().st_size
    assert half < 0.55 * full
    base = load_base(tmp_path / "half.safetensors")
    assert all(p.dtype == torch.float32 for p in base.model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(base.model(x_sample()), unetr(x_sample()), rtol=0, atol=5e-2)
