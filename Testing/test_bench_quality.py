"""The quality benchmark's pieces: post-processing rules do what their names say, per-label scores on a cropped box
equal those on the whole volume, test-time mirroring maps the mirrored pass back with the sides swapped (the time
budget and mirroring of training are the engine's, tested in test_quality_options.py)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_quality as bench  # noqa: E402

from TCURLoRALib import volumes  # noqa: E402
from TCURLoRALib.cards import Label  # noqa: E402
from TCURLoRALib.cases import PreparedCase  # noqa: E402
from TCURLoRALib.metrics import label_metrics  # noqa: E402

LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "left x", (200, 0, 0)), Label(2, "right x", (0, 200, 0))]


def test_postprocessing_rules_remove_what_their_names_say():
    image = np.zeros((30, 30, 30), np.float32)
    image[5:25, 5:25, 5:25] = 1.0
    train = np.zeros(image.shape, np.int64)
    train[10:14, 10:14, 8:12] = 1
    other = np.zeros(image.shape, np.int64)
    other[10:14, 10:14, 14:18] = 1     # a second training case: the region spans both
    regions = bench.learn_all_regions([PreparedCase("t", image, train), PreparedCase("u", image, other)], 3)
    predicted = train.copy()
    predicted[19:24, 19:24, 19:24] = 1   # a stray blob larger than the structure, outside its region
    predicted[12, 12, 16] = 1            # a lone voxel inside the region, not touching
    out = {rule: bench.postprocessed(predicted, image, regions, rule, 3) for rule in bench.POSTPROCESS}
    assert int((out["none"] == 1).sum()) == 64 + 125 + 1
    assert int((out["lcc"] == 1).sum()) == 125 and out["lcc"][21, 21, 21] == 1   # the larger piece wins alone
    assert int((out["box"] == 1).sum()) == 64 + 1
    assert int((out["box+lcc"] == 1).sum()) == 64 and out["box+lcc"][11, 11, 9] == 1


def test_label_scores_on_the_cropped_box_equal_the_whole_volume():
    rng = np.random.default_rng(1)
    reference = np.zeros((40, 44, 36), np.uint16)
    reference[10:20, 12:22, 8:16] = 1
    reference[25:30, 5:9, 20:30] = 2
    prediction = reference.copy()
    prediction[rng.random(reference.shape) < 0.002] = 1   # scattered false positives
    prediction[26:29, 5:9, 20:30] = 0
    spacing = (1.0, 1.5, 2.0)
    scores = bench.label_scores(prediction, reference, spacing, LABELS)
    whole = label_metrics(prediction, reference, spacing, LABELS)
    for item in whole:
        assert scores[item.name]["dice"] == pytest.approx(item.dice, abs=1e-4)
        assert scores[item.name]["hd95"] == pytest.approx(item.hd95_mm, abs=0.01)
        assert scores[item.name]["predicted"] == item.prediction_voxels
    empty = bench.label_scores(np.zeros_like(reference), np.zeros_like(reference), spacing, LABELS)
    assert empty["left x"]["dice"] == 1.0 and empty["left x"]["hd95"] is None


def test_test_time_mirroring_maps_the_mirrored_prediction_back_with_the_sides_swapped():
    """A 'network' that calls every bright voxel 'left x': on the mirrored image it finds the structure mirrored;
    mirrored back and swapped, that is the same voxels called 'right x'."""
    def network(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(batch), 10 * batch, torch.zeros_like(batch)], dim=1)

    image = np.zeros((32, 32, 32), np.float32)
    image[4:9, 10:14, 3:7] = 1.0   # asymmetric along every axis
    card = SimpleNamespace(orientation="RAS", patch_size=(32, 32, 32))
    direct, both = bench.softmax_passes(network, image, card, torch.device("cpu"), [(1, 2)])
    alone, none = bench.softmax_passes(network, image, card, torch.device("cpu"))
    bright = image > 0
    assert none is None and direct.shape == both.shape == (3, 32, 32, 32)
    np.testing.assert_array_equal(alone, direct)
    assert np.all(direct.argmax(0)[bright] == 1) and np.all(direct.argmax(0)[~bright] != 1)
    # the mirrored pass, mapped back, calls the same voxels 'right x' as strongly as the direct one 'left x'
    mirrored = 2 * both - direct
    np.testing.assert_allclose(mirrored[2], direct[1], atol=1e-6)
    np.testing.assert_allclose(mirrored[1], direct[2], atol=1e-6)


def _fewshot_run(fold: str, rules: dict) -> dict:
    spec = {"part": "fewshot", "variant": "mirror-all5", "fold": fold, "seed": 0, "minutes": 10.0, "clock": "cpu"}
    cases = [{"case": f"abagen-{fold}-1", "source": f"abagen-{fold}", "rules": dict(rules)},
             {"case": "mni152-nmm-0", "source": "mni152-nmm", "rules": dict(rules)}]
    return {"key": bench.job_key(spec), "spec": spec, "result": {"cases": cases, "steps": 5}}


def test_reevaluation_completes_the_rules_of_runs_that_lack_some_and_only_those(tmp_path):
    old = {"none": {"labels": {"left x": {"dice": 0.5}}}}
    complete = {rule: old["none"] for rule in bench.EVALUATED_RULES}
    runs = [_fewshot_run("9861", old), _fewshot_run("10021", complete), _fewshot_run("12876", old)]
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for fold in ("9861", "10021"):   # 12876's adapter was not saved
        (adapters / f"hippocampus-mirror-all5-{fold}-s0.safetensors").write_bytes(b"x")
    (spec,) = bench.reevaluation_specs(runs, tmp_path / "cases", adapters)
    assert (spec["of"], spec["fold"]) == (runs[0]["key"], "9861")
    assert bench.job_key(spec) == f"reevaluate/{runs[0]['key']}"

    smooth = {"smooth": {"labels": {"left x": {"dice": 0.6}}}}
    again = {"key": bench.job_key(spec), "spec": spec, "result": {"cases": [
        {"case": "abagen-9861-1", "rules": {**old, **smooth}}, {"case": "mni152-nmm-0", "rules": {**old, **smooth}}]}}
    merged = bench.merge_reevaluations(runs + [again])
    assert [run["key"] for run in merged] == [run["key"] for run in runs]
    assert [set(case["rules"]) for case in merged[0]["result"]["cases"]] == [{"none", "smooth"}] * 2
    assert merged[0]["result"]["cases"][0]["rules"]["smooth"]["labels"]["left x"]["dice"] == 0.6
    assert set(merged[2]["result"]["cases"][0]["rules"]) == {"none"}   # nothing to merge: left as it ran
    assert set(runs[0]["result"]["cases"][0]["rules"]) == {"none"}    # the runs read are not changed


def _shipped_case(source: str, dice: float, hd95: float | None) -> dict:
    scores = {"dice": dice, "hd95": hd95, "predicted": 1, "reference": 1}
    labels = {"left hippocampus": scores, "right hippocampus": {**scores, "dice": dice / 2}}
    return {"case": f"{source}-1", "source": source, "rules": {"none": {"labels": labels}, "lcc": {"labels": labels}}}


def test_group_metrics_average_each_individual_first_then_the_individuals():
    cases = [_shipped_case("abagen-15496", 0.6, 4.0), _shipped_case("abagen-15496", 0.8, 6.0),
             _shipped_case("abagen-15697", 0.4, None), _shipped_case("mni152-nmm", 0.1, 50.0)]
    scores = bench.group_metrics(cases, ("abagen-15496", "abagen-15697"), "none")
    assert scores["left hippocampus"] == {"dice": 0.55, "hd95_mm": 5.0}     # (0.7 + 0.4) / 2; 15697's HD95 is None
    assert scores["right hippocampus"]["dice"] == pytest.approx(0.28, abs=0.005)
    assert scores["mean_dice"] == pytest.approx((0.7 + 0.4 + 0.35 + 0.2) / 4, abs=1e-3)


def test_record_quality_writes_the_figures_and_command_into_the_card_and_keeps_the_tensors(tmp_path):
    import json
    import shutil

    from Testing.cohorts import record_quality
    from TCURLoRALib import tensorfiles
    from TCURLoRALib.paths import shipped_models_dir

    adapter = tmp_path / "hippocampus.safetensors"
    shutil.copyfile(shipped_models_dir() / "hippocampus.safetensors", adapter)
    cases = [_shipped_case(source, 0.5, 3.0) for group in bench.SHIPPED_TESTS.values() for source in group]
    runs = tmp_path / "runs.jsonl"
    runs.write_text(json.dumps({"key": "shipped", "result": {"adapters": {"hippocampus": cases}}}) + "\n")
    assert record_quality.main([str(adapter), "--runs", str(runs), "--command", "train it", "--work",
                                str(tmp_path / "out")]) == 0
    tensors, data = tensorfiles.load(tmp_path / "out" / adapter.name, "adapter")
    original, _ = tensorfiles.load(adapter, "adapter")
    assert tensors.keys() == original.keys() and all(torch.equal(tensors[k], original[k]) for k in tensors)
    card = json.loads(data) if isinstance(data, str) else data
    test = card["metrics"]["test"]
    assert test["held_out_individuals"]["postprocess none"]["left hippocampus"] == {"dice": 0.5, "hd95_mm": 3.0}
    assert test["other_protocol"]["postprocess largest-component"]["right hippocampus"]["dice"] == 0.25
    assert card["training"]["command"] == "train it" and card["anatomy"]


def test_smooth_winners_are_the_argmax_of_the_probabilities_resampled_whole():
    """The classes of the probabilities resampled linearly as one vector image, ties to the lower class, on an
    oblique grid of another spacing: not the nearest-neighbour map."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(30, 34, 26)).astype(np.float32))
    image.SetSpacing((0.9, 1.1, 1.3))
    image.SetDirection(sitk.VersorRigid3DTransform((0.1, 0.2, 0.3, 0.9)).GetMatrix())
    prepared = volumes.prepare_for_model(image, (2.0, 1.5, 2.5), "RAS", {"kind": "zscore_nonzero"})
    mapping = prepared.mapping
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4,) + mapping.model_grid.shape).astype(np.float32)
    logits[3] = logits[2]   # two equal channels: the lower one must win, as argmax does
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=0)
    winners = bench.smooth_winners(mapping, probabilities)
    assert winners.shape == mapping.input_grid.shape and winners.dtype == np.uint16
    np.testing.assert_array_equal(winners, mapping.probabilities_to_input(probabilities).argmax(axis=0))
    assert set(np.unique(winners)) == {0, 1, 2}
    # smoother than nearest neighbour where the grids differ: a different map, mostly the same classes
    nearest = mapping.labels_to_input(probabilities.argmax(axis=0).astype(np.uint16))
    assert 0 < np.mean(winners != nearest) < 0.5
    with pytest.raises(ValueError, match=r"probabilities must have shape \(C, \*\(.*\)\) on the model grid"):
        bench.smooth_winners(mapping, probabilities[:, 1:])
