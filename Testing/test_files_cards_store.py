"""Tests of the file layer (files.py), the cards (cards.py) and the adapter store (store.py)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from faults import flip_bytes

from TCURLoRALib import files, tensorfiles
from TCURLoRALib.cards import (AdapterCard, AdapterMismatchError, CardError, Label, ModelCard,
                               check_adapter_matches_base)
from TCURLoRALib.files import TCURLoRAFileError, TCURLoRAFileNotFoundError
from TCURLoRALib.store import AdapterStore, check_adapter_name, default_user_dir

BASE_FP = "ab" * 32
OTHER_FP = "cd" * 32


def tensors_example() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "u.attn": torch.randn(4, 4, 3, generator=generator),
        "idx.attn.rows": torch.tensor([3, 0, 7, 1], dtype=torch.int64),
        "decoder.w": torch.randn(2, 5, generator=generator).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.zeros(0, 3),
    }


def labels_example() -> list[Label]:
    return [Label(0, "background", (0, 0, 0)), Label(165, "hippocampus L", (220, 180, 20)),
            Label(166, "hippocampus R", (20, 180, 220))]


def model_card_example(**changes) -> ModelCard:
    fields = dict(
        name="compact-unetr",
        unetr=dict(in_channels=1, out_channels=3, img_size=[64, 64, 64], feature_size=16, hidden_size=192,
                   mlp_dim=768, num_heads=6, norm_name="instance"),
        spacing=(2.0, 2.0, 2.0), orientation="RAS", patch_size=(64, 64, 64),
        intensity={"method": "percentile", "low": 0.5, "high": 99.5},
        labels=labels_example(), fingerprint=BASE_FP,
        provenance={"data": "synthetic"}, metrics={"dice": {"hippocampus L": 0.8}})
    fields.update(changes)
    return ModelCard(**fields)


def save_user_adapter(store: AdapterStore, tensors: dict[str, torch.Tensor], card: AdapterCard) -> Path:
    """What a training does with a new adapter: a path from the store, then an exclusive write."""
    return tensorfiles.save_atomic(store.path_for_new(card.name), tensors, card.to_json(), "adapter", overwrite=False)


def load_adapter(store: AdapterStore, name: str) -> tuple[dict[str, torch.Tensor], AdapterCard]:
    tensors, card = tensorfiles.load(store.find(name).path, "adapter")
    return tensors, AdapterCard.from_json(card)


def adapter_card_example(**changes) -> AdapterCard:
    fields = dict(
        name="hippo-v1", base_fingerprint=BASE_FP, base_name="compact-unetr", rank=8,
        groups=["attention", "mlp_up", "mlp_down"], init="pinv", labels=labels_example(),
        training={"cases": 3, "steps": 100, "seconds": 61.5, "device": "cpu", "seed": 7, "lr": 1e-3},
        metrics={"dice": 0.7}, parent=None, created="2025-06-01T10:00:00+00:00")
    fields.update(changes)
    return AdapterCard(**fields)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------------------- files


def test_save_load_round_trip_keeps_tensors_and_card(tmp_path: Path) -> None:
    tensors = tensors_example()
    card = {"name": "x", "nested": {"list": [1, 2.5, None, "é"]}}
    path = tensorfiles.save_atomic(tmp_path / "a.safetensors", tensors, card, "adapter")
    loaded, loaded_card = tensorfiles.load(path, "adapter")
    assert_same_tensors(tensors, loaded)
    assert loaded_card == card
    assert files.read_card(path) == card
    assert files.read_card(path, "adapter") == card
    assert files.read_info(path) == ("adapter", card)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_save_writes_plain_safetensors_with_our_metadata(tmp_path: Path) -> None:
    path = tensorfiles.save_atomic(tmp_path / "b.safetensors", {"w": torch.ones(2)}, {"k": 1}, "base")
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    assert header["__metadata__"] == {"format": "tcurlora-base", "format_version": str(files.FORMAT_VERSION),
                                      "card": '{"k": 1}', "tensors_sha256": tensorfiles.digest({"w": torch.ones(2)})}
    assert torch.equal(safetensors.torch.load_file(path)["w"], torch.ones(2))


def test_save_copies_tensors_that_share_storage(tmp_path: Path) -> None:
    weight = torch.arange(12.0).reshape(3, 4)
    tensors = {"w": weight, "row": weight[1], "col": weight[:, 2]}
    loaded, _ = tensorfiles.load(tensorfiles.save_atomic(tmp_path / "s.safetensors", tensors, {}, "adapter"), "adapter")
    assert_same_tensors(tensors, loaded)


def test_save_refuses_bad_inputs(tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="kind must be one of .* got 'model'"):
        tensorfiles.save_atomic(target, {}, {}, "model")
    with pytest.raises(ValueError, match="card is not strict JSON"):
        tensorfiles.save_atomic(target, {}, {"dice": float("nan")}, "adapter")
    with pytest.raises(ValueError, match="card must be a dict, got list"):
        tensorfiles.save_atomic(target, {}, [1], "adapter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tensor 'w' must be a dense torch.Tensor, got list"):
        tensorfiles.save_atomic(target, {"w": [1.0]}, {}, "adapter")  # type: ignore[dict-item]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tensorfiles.save_atomic(tmp_path / "missing" / "x.safetensors", {}, {}, "adapter")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_leaves_no_temp_file_and_keeps_old_file(tmp_path: Path, monkeypatch, error) -> None:
    target = tmp_path / "a.safetensors"
    old = {"w": torch.zeros(3)}
    tensorfiles.save_atomic(target, old, {"version": "old"}, "adapter")
    old_bytes = target.read_bytes()

    def half_write(tmp_name, tensors, metadata):
        with open(tmp_name, "wb") as handle:
            handle.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
        raise error

    monkeypatch.setattr(tensorfiles, "_write_tensors", half_write)
    with pytest.raises(type(error)):
        tensorfiles.save_atomic(target, {"w": torch.ones(1000)}, {"version": "new"}, "adapter")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    assert target.read_bytes() == old_bytes
    with pytest.raises(type(error)):
        tensorfiles.save_atomic(tmp_path / "new.safetensors", {"w": torch.ones(3)}, {}, "adapter")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_overwrite_replaces_file(tmp_path: Path) -> None:
    target = tmp_path / "a.safetensors"
    tensorfiles.save_atomic(target, {"w": torch.zeros(3)}, {"v": 1}, "adapter")
    tensorfiles.save_atomic(target, {"w": torch.ones(2)}, {"v": 2}, "adapter")
    tensors, card = tensorfiles.load(target, "adapter")
    assert card == {"v": 2} and torch.equal(tensors["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TCURLoRAFileNotFoundError, match="no such file: .*nope.safetensors"):
        files.read_card(missing)
    with pytest.raises(FileNotFoundError):
        tensorfiles.load(missing, "base")
    with pytest.raises(TCURLoRAFileError, match="is a folder"):
        files.read_card(tmp_path)


def test_truncated_file_is_reported_at_every_cut(tmp_path: Path) -> None:
    full = tensorfiles.save_atomic(tmp_path / "full.safetensors", tensors_example(), {"n": 1}, "adapter").read_bytes()
    (length,) = struct.unpack("<Q", full[:8])
    cuts = [0, 3, 8, 9, 8 + length // 2, 8 + length, 8 + length + 1, (len(full) + 8 + length) // 2, len(full) - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(full[:cut])
        with pytest.raises(TCURLoRAFileError, match="truncated"):
            files.read_card(path)
        with pytest.raises(TCURLoRAFileError, match="truncated"):
            tensorfiles.load(path, "adapter")


def test_corrupt_header_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    body = b"{not json}"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(TCURLoRAFileError, match="header is not JSON"):
        files.read_card(path)
    good = tensorfiles.save_atomic(tmp_path / "g.safetensors", {"w": torch.ones(2)}, {}, "base").read_bytes()
    (tmp_path / "extra.safetensors").write_bytes(good + b"\x00" * 4)
    with pytest.raises(TCURLoRAFileError, match="tensors cover 8 data bytes but the file holds 12"):
        files.read_card(tmp_path / "extra.safetensors")


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path, metadata={"format": "pt"})
    with pytest.raises(TCURLoRAFileError, match="not a TCURLoRA file: unknown format 'pt'"):
        files.read_card(path)
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    with pytest.raises(TCURLoRAFileError, match="not a TCURLoRA file: its metadata has no 'format' entry"):
        tensorfiles.load(path, "base")


def test_wrong_kind_is_refused(tmp_path: Path) -> None:
    adapter = tensorfiles.save_atomic(tmp_path / "a.safetensors", {"w": torch.ones(1)}, {}, "adapter")
    base = tensorfiles.save_atomic(tmp_path / "b.safetensors", {"w": torch.ones(1)}, {}, "base")
    with pytest.raises(TCURLoRAFileError, match="is a TCURLoRA adapter file, but a TCURLoRA base file was expected"):
        tensorfiles.load(adapter, "base")
    with pytest.raises(TCURLoRAFileError, match="is a TCURLoRA base file, but a TCURLoRA adapter file was expected"):
        files.read_card(base, "adapter")


@pytest.mark.parametrize("version, message", [
    (str(files.FORMAT_VERSION + 1), "newer than the"),
    ("0", "invalid format_version '0'"),
    ("one", "invalid format_version 'one'"),
    ("2", "has no 'tensors_sha256' entry, which format_version 2 files carry"),  # a digest was removed
])
def test_unsupported_format_version_or_missing_digest_is_refused(tmp_path: Path, version: str, message: str) -> None:
    path = tmp_path / "v.safetensors"
    metadata = {"format": "tcurlora-adapter", "format_version": version, "card": "{}"}
    safetensors.torch.save_file({"w": torch.ones(1)}, path, metadata=metadata)
    with pytest.raises(TCURLoRAFileError, match=message):
        tensorfiles.load(path, "adapter")


def test_card_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    metadata = {"format": "tcurlora-base", "format_version": "1", "card": "[1, 2]"}
    safetensors.torch.save_file({"w": torch.ones(1)}, path, metadata=metadata)
    with pytest.raises(TCURLoRAFileError, match="card that is a list, not a JSON object"):
        files.read_card(path)


def test_fingerprint_independent_of_order_device_and_layout() -> None:
    tensors = tensors_example()
    reference = tensorfiles.fingerprint(tensors)
    assert len(reference) == 64 and int(reference, 16) >= 0
    assert tensorfiles.fingerprint(dict(reversed(list(tensors.items())))) == reference
    transposed = dict(tensors, **{"u.attn": tensors["u.attn"].transpose(0, 2).contiguous().transpose(0, 2)})
    assert not transposed["u.attn"].is_contiguous()
    assert tensorfiles.fingerprint(transposed) == reference


def test_fingerprint_survives_save_and_load(tmp_path: Path) -> None:
    tensors = tensors_example()
    loaded, _ = tensorfiles.load(tensorfiles.save_atomic(tmp_path / "f.safetensors", tensors, {}, "base"), "base")
    assert tensorfiles.fingerprint(loaded) == tensorfiles.fingerprint(tensors)


def test_fingerprint_sensitive_to_value_name_dtype_and_shape() -> None:
    tensors = tensors_example()
    reference = tensorfiles.fingerprint(tensors)
    one_value = dict(tensors, **{"u.attn": tensors["u.attn"].clone()})
    one_value["u.attn"][1, 2, 0] += 1e-6
    renamed = {("U.attn" if k == "u.attn" else k): v for k, v in tensors.items()}
    retyped = dict(tensors, **{"idx.attn.rows": tensors["idx.attn.rows"].to(torch.int32)})
    reshaped = dict(tensors, **{"u.attn": tensors["u.attn"].reshape(3, 4, 4)})
    fewer = {k: v for k, v in tensors.items() if k != "empty"}
    variants = [one_value, renamed, retyped, reshaped, fewer]
    prints = {tensorfiles.fingerprint(v) for v in variants}
    assert reference not in prints and len(prints) == len(variants)


# ---------------------------------------------------------------------------------------------------------- cards


def test_model_card_round_trip_through_json_text() -> None:
    card = model_card_example()
    data = card.to_json()
    assert data["labels"][1] == {"value": 165, "name": "hippocampus L", "color": [220, 180, 20]}
    again = ModelCard.from_json(json.dumps(data))
    assert again == card
    assert again.to_json() == data
    assert card.unetr_kwargs()["img_size"] == (64, 64, 64)


def test_adapter_card_round_trip_and_defaults() -> None:
    card = adapter_card_example()
    assert AdapterCard.from_json(card.to_json()) == card
    fresh = AdapterCard(name="n", base_fingerprint=BASE_FP, base_name="b", rank=1, groups=[], init="zero",
                        labels=labels_example(), training={"cases": 0, "steps": 0, "seconds": 0, "device": "cpu",
                                                           "seed": 0})
    assert fresh.format_version == 1 and fresh.parent is None and fresh.created.endswith("+00:00")
    assert AdapterCard.from_json(fresh.to_json()) == fresh


def test_card_does_not_share_dicts_with_caller() -> None:
    training = {"cases": 1, "steps": 2, "seconds": 3.0, "device": "cpu", "seed": 4}
    card = adapter_card_example(training=training)
    training["steps"] = 99
    assert card.training["steps"] == 2


def test_from_json_names_missing_and_unknown_fields() -> None:
    data = adapter_card_example().to_json()
    del data["rank"], data["init"]
    with pytest.raises(CardError, match=r"missing required fields \['rank', 'init'\]"):
        AdapterCard.from_json(data)
    data = model_card_example().to_json()
    data["colour_map"] = "x"
    with pytest.raises(CardError, match=r"unknown keys \['colour_map'\]"):
        ModelCard.from_json(data)
    data = adapter_card_example().to_json()
    del data["format_version"]
    with pytest.raises(CardError, match=r"missing required fields \['format_version'\]"):
        AdapterCard.from_json(data)
    with pytest.raises(CardError, match="not valid JSON"):
        ModelCard.from_json("{oops")


@pytest.mark.parametrize("args, message", [
    ((-1, "x", (0, 0, 0)), "label value must be an integer >= 0, got -1"),
    ((True, "x", (0, 0, 0)), "label value must be an integer >= 0, got True"),
    ((1, "", (0, 0, 0)), "label name must be a non-empty"),
    ((1, "x", (0, 256, 0)), r"color must be 3 integers in 0-255, got \(0, 256, 0\)"),
    ((1, "x", (0, 0)), r"color must be 3 integers in 0-255, got \(0, 0\)"),
    ((1, "x", (0.5, 0, 0)), r"color must be 3 integers in 0-255"),
])
def test_label_validation(args, message) -> None:
    with pytest.raises(CardError, match=message):
        Label(*args)


def test_label_color_list_becomes_tuple() -> None:
    assert Label(1, "a", [1, 2, 3]).color == (1, 2, 3)  # type: ignore[arg-type]


bg = Label(0, "background", (0, 0, 0))


@pytest.mark.parametrize("changes, message", [
    ({"name": ""}, "model name must be a non-empty"),
    ({"spacing": (1.0, 0.0, 1.0)}, r"spacing must be 3 positive finite numbers \(mm\), got \(1.0, 0.0, 1.0\)"),
    ({"spacing": (1.0, 1.0)}, "spacing must be 3 positive"),
    ({"spacing": (1.0, float("inf"), 1.0)}, "spacing must be 3 positive"),
    ({"orientation": "RAR"}, "orientation must be 3 letters.*got 'RAR'"),
    ({"orientation": "ras"}, "orientation must be 3 letters.*got 'ras'"),
    ({"patch_size": (96, 96, 96)}, r"patch_size \[96, 96, 96\] must equal unetr img_size \[64, 64, 64\]"),
    ({"fingerprint": "XYZ"}, "fingerprint must be 64 lowercase hex digits.*got 'XYZ'"),
    ({"intensity": {}}, "intensity must describe"),
    ({"metrics": {"dice": float("nan")}}, "metrics must be strict JSON"),
    ({"labels": [Label(1, "a", (1, 1, 1)), Label(0, "b", (0, 0, 0)), Label(2, "c", (0, 0, 0))]},
     "labels\\[0\\] must be the background with value 0"),
    ({"labels": [bg, Label(1, "a", (1, 1, 1)), Label(1, "b", (0, 0, 0))]},
     "label values must be unique: 1 appears twice"),
    ({"labels": [bg, Label(1, "Liver", (1, 1, 1)), Label(2, "liver", (0, 0, 0))]},
     "label names must be unique: 'liver' appears twice"),
    ({"labels": [bg]}, "labels must be a list of at least 2 Labels"),
    ({"labels": [bg, {"value": 1}]}, "labels must hold Label objects"),
    ({"labels": [bg, Label(1, "a", (1, 1, 1))]}, "out_channels 3 must equal the number of labels 2"),
])
def test_model_card_validation(changes, message) -> None:
    with pytest.raises(CardError, match=message):
        model_card_example(**changes)


@pytest.mark.parametrize("unetr_changes, message", [
    ({"img_size": [64, 64, 60]}, r"img_size \[64, 64, 60\] must be multiples of 16"),
    ({"num_heads": 5}, "hidden_size 192 must be divisible by num_heads 5"),
    ({"feature_size": 0}, "feature_size must be an integer >= 1, got 0"),
    ({"spatial_dims": 2}, "spatial_dims must be 3, got 2"),
    ({"pos_embed": "conv"}, r"unknown keys \['pos_embed'\]"),
    ({"mlp_dim": None}, r"unetr is missing \['mlp_dim'\]"),
])
def test_model_card_unetr_validation(unetr_changes, message) -> None:
    unetr = dict(model_card_example().unetr, **unetr_changes)
    unetr = {k: v for k, v in unetr.items() if v is not None}
    with pytest.raises(CardError, match=message):
        model_card_example(unetr=unetr)


@pytest.mark.parametrize("changes, message", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"rank": 2.0}, "rank must be an integer >= 1, got 2.0"),
    ({"init": "random"}, r"init must be one of \('pinv', 'zero'\), got 'random'"),
    ({"groups": ["attention", "attention"]}, r"groups must be unique, \['attention'\] repeated"),
    ({"groups": ["attn"]}, r"unknown weight group\(s\) \['attn'\] in groups"),
    ({"groups": ["attn", ""]}, "groups must be a list of non-empty strings"),
    ({"base_fingerprint": "ab" * 31}, "base_fingerprint must be 64 lowercase hex digits"),
    ({"training": {"cases": 3, "steps": 1}}, r"training record is missing \['seconds', 'device', 'seed'\]"),
    ({"training": {"cases": -1, "steps": 1, "seconds": 1, "device": "cpu", "seed": 0}},
     "training cases must be an integer >= 0, got -1"),
    ({"training": {"cases": 1, "steps": 1, "seconds": -2.0, "device": "cpu", "seed": 0}},
     "training seconds must be a number >= 0, got -2.0"),
    ({"created": "yesterday"}, "created must be an ISO 8601 time.*got 'yesterday'"),
    ({"created": "2025-06-01T10:00:00"}, "with a UTC offset"),
    ({"parent": ""}, "parent adapter name must be a non-empty"),
    ({"format_version": 2}, "format_version 2 is newer than the 1"),
])
def test_adapter_card_validation(changes, message) -> None:
    with pytest.raises(CardError, match=message):
        adapter_card_example(**changes)


def test_check_adapter_matches_base() -> None:
    model = model_card_example()
    check_adapter_matches_base(adapter_card_example(), model)
    other = adapter_card_example(base_fingerprint=OTHER_FP, base_name="unetr-b")
    with pytest.raises(AdapterMismatchError, match=f"'hippo-v1' was trained on base model 'unetr-b' "
                                                   f"\\(fingerprint {OTHER_FP}\\).*'compact-unetr' "
                                                   f"\\(fingerprint {BASE_FP}\\)"):
        check_adapter_matches_base(other, model)


def test_model_card_fits_in_a_base_file(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(2, 2)}
    card = model_card_example(fingerprint=tensorfiles.fingerprint(tensors))
    path = tensorfiles.save_atomic(tmp_path / "base.safetensors", tensors, card.to_json(), "base")
    loaded, data = tensorfiles.load(path, "base")
    assert ModelCard.from_json(data) == card
    assert tensorfiles.fingerprint(loaded) == card.fingerprint


# ---------------------------------------------------------------------------------------------------------- store


@pytest.fixture()
def store_dirs(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A shipped folder with one adapter, a base model and a damaged file; TCURLORA_HOME pointing to tmp_path."""
    shipped = tmp_path / "Models"
    shipped.mkdir()
    tensorfiles.save_atomic(shipped / "Shipped-A.safetensors", {"u": torch.ones(2)},
                      adapter_card_example(name="Shipped-A").to_json(), "adapter")
    tensorfiles.save_atomic(shipped / "base.safetensors", {"w": torch.ones(2)}, model_card_example().to_json(), "base")
    (shipped / "broken.safetensors").write_bytes(b"\x00\x01")
    (shipped / "README.txt").write_text("not an adapter")
    home = tmp_path / "home"
    monkeypatch.setenv("TCURLORA_HOME", str(home))
    return shipped, home / "adapters"


def test_default_user_dir_follows_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TCURLORA_HOME", str(tmp_path / "h"))
    assert default_user_dir() == tmp_path / "h" / "adapters"
    monkeypatch.delenv("TCURLORA_HOME")
    assert default_user_dir() == Path.home() / ".tcurlora" / "adapters"


def test_store_lists_shipped_and_user_and_reports_unreadable(store_dirs) -> None:
    shipped, user = store_dirs
    store = AdapterStore(shipped)
    assert store.user_dir == user
    entries = store.list()
    assert [(e.name, e.source, e.read_only) for e in entries] == [("Shipped-A", "shipped", True)]
    assert not user.exists()  # created only on the first write
    assert [p.path.name for p in store.problems] == ["broken.safetensors"]
    assert "truncated" in store.problems[0].message

    save_user_adapter(store, {"u": torch.zeros(3)}, adapter_card_example(name="mine"))
    save_user_adapter(store, {"u": torch.zeros(3)}, adapter_card_example(name="another one"))
    (user / "junk.safetensors").write_bytes(b"junk" * 10)
    entries = store.list()
    assert [(e.name, e.source, e.read_only) for e in entries] == [
        ("another one", "user", False), ("mine", "user", False), ("Shipped-A", "shipped", True)]
    assert entries[1].card.name == "mine" and entries[1].path == user / "mine.safetensors"
    assert sorted(p.path.name for p in store.problems) == ["broken.safetensors", "junk.safetensors"]
    tensors, card = load_adapter(store, "mine")
    assert torch.equal(tensors["u"], torch.zeros(3)) and card == adapter_card_example(name="mine")


def test_store_missing_shipped_folder_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "none", tmp_path / "user")
    assert store.list() == []
    assert "does not exist" in store.problems[0].message


@pytest.mark.parametrize("name, message", [
    ("../evil", "must not contain path separators"),
    ("a/b", "must not contain path separators"),
    ("a\\b", "must not contain path separators"),
    (".hidden", "must not start or end with '.'"),
    ("a..b", "contain '..'"),
    ("", "must be a non-empty string, got ''"),
    (" lead", "must not start or end with a space"),
    ("tab\there", "has characters \\['\\\\t'\\] not allowed"),
    ("Hüfte", "has characters \\['ü'\\] not allowed"),
    ("x" * 101, "is 101 characters long, the limit is 100"),
    ("nul.v1", "reserved device name"),
])
def test_adapter_names_are_sanitised(tmp_path: Path, name: str, message: str) -> None:
    store = AdapterStore(tmp_path / "shipped", tmp_path / "user")
    with pytest.raises(ValueError, match=message):
        store.path_for_new(name)
    assert not (tmp_path / "user").exists()


def test_good_names_accepted() -> None:
    for name in ["a", "Hippo v1.2", "x_y-z", "x" * 100]:
        assert check_adapter_name(name) == name


def test_path_for_new_refuses_existing_and_shipped_names(store_dirs) -> None:
    shipped, user = store_dirs
    store = AdapterStore(shipped)
    path = store.path_for_new("mine")
    assert path == user / "mine.safetensors" and user.is_dir()
    save_user_adapter(store, {"u": torch.ones(1)}, adapter_card_example(name="mine"))
    with pytest.raises(FileExistsError, match="'mine' already exists"):
        store.path_for_new("mine")
    assert store.path_for_new("mine", overwrite=True) == path
    with pytest.raises(FileExistsError, match="'MINE' differs only in case"):
        store.path_for_new("MINE", overwrite=True)
    for name in ["Shipped-A", "shipped-a"]:
        with pytest.raises(PermissionError, match=f"'{name}' is the name of a shipped adapter"):
            store.path_for_new(name, overwrite=True)


def test_delete_and_rename_user_adapters(store_dirs) -> None:
    shipped, user = store_dirs
    store = AdapterStore(shipped)
    save_user_adapter(store, {"u": torch.arange(3.0)}, adapter_card_example(name="old"))
    save_user_adapter(store, {"u": torch.ones(1)}, adapter_card_example(name="taken"))
    new_path = store.rename("old", "new")
    assert new_path == user / "new.safetensors" and not (user / "old.safetensors").exists()
    tensors, card = load_adapter(store, "new")
    assert card.name == "new" and torch.equal(tensors["u"], torch.arange(3.0))
    with pytest.raises(FileExistsError, match="'taken' already exists"):
        store.rename("new", "taken")
    store.rename("new", "NEW")
    assert store.find("new").name == "NEW"
    store.delete("NEW")
    store.delete("taken")
    assert [e.name for e in store.list()] == ["Shipped-A"]
    assert sorted(os.listdir(user)) == []
    with pytest.raises(FileNotFoundError, match="no user adapter named 'ghost'"):
        store.delete("ghost")


def test_shipped_adapters_cannot_be_deleted_or_renamed(store_dirs) -> None:
    shipped, _user = store_dirs
    store = AdapterStore(shipped)
    with pytest.raises(PermissionError, match="'Shipped-A' is a shipped adapter \\(read only\\): it cannot be deleted"):
        store.delete("Shipped-A")
    with pytest.raises(PermissionError, match="it cannot be renamed"):
        store.rename("Shipped-A", "mine")
    save_user_adapter(store, {"u": torch.ones(1)}, adapter_card_example(name="mine"))
    with pytest.raises(PermissionError, match="'Shipped-A' is the name of a shipped adapter"):
        store.rename("mine", "Shipped-A")
    assert (shipped / "Shipped-A.safetensors").exists()
    with pytest.raises(ValueError, match="path separators"):
        store.delete("../Models/Shipped-A")


def test_find_prefers_shipped_on_a_clash_and_reports_it(store_dirs) -> None:
    shipped, user = store_dirs
    store = AdapterStore(shipped)
    user.mkdir(parents=True)
    # A user file with a shipped name can only appear when a later release ships that name.
    tensorfiles.save_atomic(user / "shipped-a.safetensors", {"u": torch.zeros(1)},
                      adapter_card_example(name="shipped-a").to_json(), "adapter")
    assert store.find("Shipped-A").source == "shipped"
    assert store.find("SHIPPED-A").source == "shipped"
    assert store.find("shipped-a").source == "user"  # an exact match wins
    assert any("has the name of a shipped adapter" in p.message for p in store.problems)
    with pytest.raises(FileNotFoundError, match=r"no adapter named 'nothing'; available: \["):
        store.find("nothing")


# ---------------------------------------------------------------------------------------------------------- integrity


def test_digest_written_equals_digest_read_from_the_file(tmp_path: Path) -> None:
    """The writer hashes tensors, the reader the file's bytes: one rule, every dtype (bf16, bool, f16 scalar,
    empty)."""
    tensors = tensors_example()
    path = tensorfiles.save_atomic(tmp_path / "a.safetensors", tensors, {}, "adapter")
    contents = files.read_whole(path, "adapter")
    assert contents.checked and contents.version == files.FORMAT_VERSION
    assert files.read_card(path) == {}
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        stored = json.loads(handle.read(length))["__metadata__"][files.DIGEST_KEY]
    assert stored == tensorfiles.digest(tensors)
    assert tensorfiles.digest(dict(reversed(list(tensors.items())))) == stored


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_any_flipped_byte_of_a_tensor_is_refused(tmp_path: Path, where: str) -> None:
    path = tensorfiles.save_atomic(tmp_path / "a.safetensors", tensors_example(), {"name": "x"}, "adapter")
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    position = {"first": 8 + length, "middle": (8 + length + len(data)) // 2, "last": len(data) - 1}[where]
    flip_bytes(path, position, mask=0x10)
    assert files.read_card(path) == {"name": "x"}, "the header is intact: listing still works"
    with pytest.raises(TCURLoRAFileError, match=r"is damaged: its tensors do not match the digest it was written "
                                                r"with .*copy the file again from where it came from, or retrain it"):
        tensorfiles.load(path, "adapter")


def test_a_version_1_adapter_loads_as_legacy_with_a_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "v1.safetensors"
    metadata = {"format": "tcurlora-adapter", "format_version": "1", "card": '{"n": 1}'}
    safetensors.torch.save_file({"w": torch.ones(2)}, path, metadata=metadata)
    with caplog.at_level("WARNING"):
        tensors, card = tensorfiles.load(path, "adapter")
    assert card == {"n": 1} and torch.equal(tensors["w"], torch.ones(2))
    assert "written without a tensor digest: its tensors cannot be checked" in caplog.text
    assert not files.read_whole(path, "adapter").checked


def two_versions(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A file and two complete versions of it, each card saying which tensors it belongs with."""
    a = tensorfiles.save_atomic(tmp_path / "a.safetensors", {"w": torch.zeros(50_000)}, {"version": "a"}, "adapter")
    b = tensorfiles.save_atomic(tmp_path / "b.safetensors", {"w": torch.ones(50_000)}, {"version": "b"}, "adapter")
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(a.read_bytes())
    return target, a, b


def test_a_file_replaced_while_it_is_read_gives_one_version_whole(tmp_path: Path, monkeypatch) -> None:
    """The reader opens the file, then another process renames a new version onto it (an atomic save): header and
    tensors must both be the old version (one open file), never the old card with the new tensors."""
    target, _a, b = two_versions(tmp_path)
    real_open = open

    def open_then_replaced(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        if Path(path) == target:
            os.replace(tmp_path / "b-copy.safetensors", target)
        return handle

    (tmp_path / "b-copy.safetensors").write_bytes(b.read_bytes())
    monkeypatch.setattr(files, "open", open_then_replaced, raising=False)
    tensors, card = tensorfiles.load(target, "adapter")
    assert card == {"version": "a"} and not tensors["w"].any()


REPLACE_IN_A_LOOP = """
import os, sys
from pathlib import Path
target, a, b = (Path(p) for p in sys.argv[1:4])
for index in range(int(sys.argv[4])):
    source = a if index % 2 else b
    temporary = target.with_name(f".swap{index}")
    temporary.write_bytes(source.read_bytes())
    os.replace(temporary, target)
"""


def test_reading_while_another_process_replaces_the_file_pairs_no_card_with_the_other_tensors(tmp_path: Path) -> None:
    import subprocess
    import sys

    target, a, b = two_versions(tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", REPLACE_IN_A_LOOP, str(target), str(a), str(b), "3000"])
    try:
        reads = 0
        while writer.poll() is None or reads < 20:
            tensors, card = tensorfiles.load(target, "adapter")
            assert bool(tensors["w"].all()) == (card["version"] == "b") and bool(tensors["w"].any()) == (
                card["version"] == "b"), f"card of version {card['version']} with the other version's tensors"
            reads += 1
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0


# ---------------------------------------------------------------------------------------------------------- no torch

NO_TORCH = """
from TCURLoRALib import files, store

entries = store.adapter_store().list()
print([entry.name for entry in entries])
print(files.read_card(store.resolve_base(None), "base")["name"])
print(store.resolve_adapter("mine"))
print([m for m in ("torch", "monai", "numpy") if m in sys.modules])
"""


def test_listing_adapters_and_reading_cards_needs_no_torch(store_dirs) -> None:
    from faults import run_python_without

    shipped, user = store_dirs
    (shipped / "broken.safetensors").unlink()
    save_user_adapter(AdapterStore(shipped), {"u": torch.ones(1)}, adapter_card_example(name="mine"))
    result = run_python_without(("torch", "monai", "numpy"), NO_TORCH,
                                env={"TCURLORA_MODELS": str(shipped), "TCURLORA_HOME": str(user.parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['mine', 'Shipped-A']", "compact-unetr", str(user / "mine.safetensors"),
                                          "[]"]
