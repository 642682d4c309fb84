"""The few-shot benchmark's protocol: which cases each run gets and what each method trains and stores.

The benchmark's numbers are only comparable if every method sees the same cases and trains what its name says;
these tests check that on the tiny base (LoRA needs ``peft``, which the test requirements leave out).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import make_tiny_base

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_fewshot as bench  # noqa: E402

from TCURLoRALib.cards import Label  # noqa: E402
from TCURLoRALib.cases import PreparedCase  # noqa: E402
from TCURLoRALib.loop import adapter_optimizer, fit  # noqa: E402
from TCURLoRALib.settings import TrainSettings  # noqa: E402

TRAIN_NAMES = [f"train-{i:03d}-{source}" for i, source in enumerate(["cat12", "abagen-1", "abagen-2", "abagen-3"] * 2)]
LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "left", (200, 0, 0)), Label(2, "right", (0, 200, 0))]


def test_case_source_strips_split_and_index():
    assert bench.case_source("train-004-abagen-9861") == "abagen-9861"
    assert bench.case_source("train-000-cat12") == "cat12"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selected_cases_are_nested_and_distinct_individuals_first(seed):
    chosen = {n: bench.select_cases(TRAIN_NAMES, n, seed) for n in (1, 3, 4, 5, 8)}
    for smaller, larger in ((1, 3), (3, 4), (4, 5), (5, 8)):
        assert chosen[larger][:smaller] == chosen[smaller]
    assert len({bench.case_source(name) for name in chosen[4]}) == 4
    assert sorted(chosen[8]) == sorted(TRAIN_NAMES)
    assert bench.select_cases(TRAIN_NAMES, 5, seed) == chosen[5]  # reproducible


def test_seeds_draw_different_cases_and_bad_counts_are_refused():
    assert len({tuple(bench.select_cases(TRAIN_NAMES, 3, seed)) for seed in range(4)}) > 1
    for n in (0, 9):
        with pytest.raises(ValueError, match="cannot draw"):
            bench.select_cases(TRAIN_NAMES, n, 0)


def test_method_keys_round_trip():
    methods = bench.methods_for(bench.FULL, matched_lora_rank=1)
    assert [bench.Method.from_key(m.key) for m in methods] == methods
    keys = {m.key for m in methods}
    assert {"tcur-pinv-r4", "tcur-zero-r16", "lora-r1", "lora-r32", "decoder", "full", "none"} <= keys
    with pytest.raises(ValueError, match="unknown method"):
        bench.Method.from_key("adapter-r8")


def test_matched_lora_rank_follows_the_counts(tmp_path):
    from TCURLoRALib.basemodel import load_base

    unetr = load_base(make_tiny_base(tmp_path / "base.safetensors")).model
    per_rank = sum(linear.in_features + linear.out_features for _, linear in bench.lora_targets(unetr))
    assert len(bench.lora_targets(unetr)) == 4 * len(unetr.vit.blocks)
    for tcur_rank in (2, 8):
        u_count = tcur_rank**2 * (6 * len(unetr.vit.blocks))  # n3: 4 L attention slices, L mlp-up, L mlp-down
        assert bench.lora_matched_rank(unetr, tcur_rank) == max(1, round(u_count / per_rank))


def _cases(shape=(32, 32, 32)) -> list[PreparedCase]:
    rng = np.random.default_rng(0)
    target = np.zeros(shape, dtype=np.int64)
    target[8:14, 10:20, 6:14], target[8:14, 10:20, 18:26] = 1, 2
    return [PreparedCase("case", (target * 0.5 + rng.normal(0, 0.1, shape)).astype(np.float32), target)]


@pytest.mark.parametrize("kind", ["tcur", "decoder", "full"])
def test_each_method_trains_what_its_name_says(tmp_path, one_torch_thread, kind):
    base_path = make_tiny_base(tmp_path / "base.safetensors")
    method = bench.Method(kind, 2, "pinv") if kind == "tcur" else bench.Method(kind)
    cases = _cases()
    model, encoder_side, decoder_and_head, stored = bench.build(method, base_path, LABELS, cases, seed=0)
    trainable = {id(p) for p in encoder_side + decoder_and_head}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    assert getattr(model, "base", model).out.conv.conv.out_channels == len(LABELS)
    frozen = [p for p in model.parameters() if id(p) not in trainable]
    before = [p.detach().clone() for p in encoder_side + decoder_and_head + frozen]

    fit(model, adapter_optimizer(encoder_side, decoder_and_head, 1e-2, 1e-2), cases, [], labels=LABELS,
        patch_size=(32, 32, 32), settings=TrainSettings(steps=2, batch_size=1, validate_every=1, seed=0))

    after = [p.detach() for p in encoder_side + decoder_and_head + frozen]
    moved = [not torch.equal(b, a) for b, a in zip(before, after)]
    n_encoder, n_decoder = len(encoder_side), len(decoder_and_head)
    assert (n_encoder > 0) == (kind != "decoder")
    if kind == "tcur":
        assert all(moved[:n_encoder])  # every group's U took a step
    else:  # all but the weights the forward pass never uses (MONAI's unused cross-attention norms)
        assert sum(moved[:n_encoder]) >= 0.8 * n_encoder
    assert sum(moved[n_encoder:n_encoder + n_decoder]) >= n_decoder // 2
    assert not any(moved[n_encoder + n_decoder:])  # nothing else changed
    assert (len(frozen) == 0) == (kind == "full")
    saved = {name[len("base."):] if name.startswith("base.") else name: value for name, value in stored().items()}
    assert any(name.startswith("decoder2.") for name in saved) and any(name.startswith("out.") for name in saved)
    if kind == "tcur":
        assert any(name.startswith("tcur.") and name.endswith(".u") for name in saved)
    if kind == "full":
        assert len(saved) == len(model.state_dict())
    else:
        assert not any(name.startswith(("vit.", "encoder1.")) for name in saved)
    size = bench.save_stored(saved, tmp_path / "stored.safetensors")
    assert size == (tmp_path / "stored.safetensors").stat().st_size > sum(v.numel() for v in saved.values()) * 4


def test_no_adaptation_starts_at_the_label_prior(tmp_path):
    cases = _cases()
    model, encoder_side, _, stored = bench.build(bench.Method("none"), make_tiny_base(tmp_path / "b.safetensors"),
                                                 LABELS, cases, seed=0)
    assert encoder_side == []
    assert float(model.out.conv.conv.weight.detach().abs().sum()) == 0.0
    frequency = np.bincount(cases[0].target.ravel(), minlength=3)
    assert int(model.out.conv.conv.bias.detach().argmax()) == int(frequency.argmax()) == 0
    assert not any(name.startswith("vit.") for name in stored())


def test_summary_reports_mean_and_spread_per_n():
    runs = [
        {"method": "decoder", "n": n, "seed": seed, "mean_dice": dice, "dice": {"left": dice, "right": dice},
         "mean_hd95_mm": 5.0 + seed, "hd95_undefined": 0, "trainable": {"encoder_side": 0, "total": 100},
         "file_bytes": 400, "step_peak_mib": 10.0, "wall_s": 2.0}
        for n, seed, dice in ((1, 0, 0.2), (1, 1, 0.4), (3, 0, 0.6), (3, 1, 0.6))
    ]
    rows = bench.summary_rows(runs, [bench.Method("decoder")], (1, 3), {"decoder": 0.5, "tcur-pinv-r8": 0.25})
    assert rows[0]["dice"] == {1: [0.2, 0.4], 3: [0.6, 0.6]} and rows[0]["step_ratio"] == 2.0
    table = bench.markdown(rows, (1, 3), ["# title"])
    assert "| decoder only | 0 + 100 | 400 B |" in table
    assert "0.300 ± 0.141" in table and "0.600 ± 0.000" in table and "5.5 ± 0.7" in table and "0.50 (2.00)" in table
