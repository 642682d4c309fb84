"""Benchmark of segmentation: a merged tCURLoRA adapter against the base alone, and the time to switch adapters.

Run from the repository root::

    python Testing/benchmarks/bench_segment.py [--img 64] [--spacing 1.5] [--repeats 5] [--threads N]
                                               [--device cpu] [--out results.md]

Setup (random weights, in a temporary folder): a compact UNETR base (hidden 192, MLP 768, 6 heads, feature_size 16,
img ``--img``^3, 3 labels, card spacing ``--spacing`` mm, RAS, z-score) written with ``save_base``; two adapters
(rank 8, all three groups, U moved randomly away from U0, decoder perturbed) made with ``TCURLoRAModel`` and written
with ``save_adapter``; a synthetic 160 x 192 x 160 volume at 1 mm (a noisy ellipsoid).

Table 1, segmentation of the volume by ``segment_volume`` (reorientation, resampling, normalisation, Gaussian sliding
window with overlap 0.25, argmax, return to the input grid), with (a) the base alone and (b) an ``AdaptedUNETR``
session on a second copy of the base with an adapter merged; and the network's forward pass on one window for both.
Both are timed in rounds, alternating which goes first, so that load from other processes hits both alike; median
and fastest run, and the ratio (b)/(a). The goal is a ratio <= 1.02: merging puts ΔW into the weights, so the
adapter must cost nothing per voxel.

Table 2, ``AdaptedUNETR.set_adapter``: none -> adapter (read, check, build the groups, merge), adapter -> other
adapter (unmerge, restore, read, merge), adapter -> none (unmerge and restore); median and fastest of ``--repeats``.

Not part of the pytest suite (the file name does not match ``test_*.py``) and imported by no test.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "TCURLoRASegment"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.networks.nets import UNETR  # noqa: E402

from TCURLoRALib import volumes  # noqa: E402
from TCURLoRALib.adapter import AdaptedUNETR, save_adapter  # noqa: E402
from TCURLoRALib.basemodel import load_base, save_base  # noqa: E402
from TCURLoRALib.cards import AdapterCard, Label  # noqa: E402
from TCURLoRALib.segmentation import count_windows, segment_volume  # noqa: E402
from TCURLoRALib.tcur import TCURLoRAConfig, TCURLoRAModel  # noqa: E402

COMPACT = {"in_channels": 1, "out_channels": 3, "feature_size": 16, "hidden_size": 192, "mlp_dim": 768,
           "num_heads": 6}
LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "grey matter", (200, 200, 200)),
          Label(2, "white matter", (250, 250, 225))]
VOLUME_SHAPE = (160, 192, 160)  # (z, y, x) voxels
VOLUME_SPACING = (1.0, 1.0, 1.0)  # x, y, z in mm
RANK = 8
OVERLAP = 0.25


def make_base(folder: Path, img: int, spacing: float) -> Path:
    torch.manual_seed(0)
    unetr = UNETR(**COMPACT, img_size=(img, img, img))
    path = folder / "base.safetensors"
    save_base(path, unetr, {
        "name": f"compact-{img}", "unetr": {**COMPACT, "img_size": [img] * 3}, "spacing": [spacing] * 3,
        "orientation": "RAS", "patch_size": [img] * 3, "intensity": {"kind": "zscore_nonzero"},
        "labels": [label.to_json() for label in LABELS], "provenance": {"source": "bench_segment.py, random"},
        "metrics": {}})
    return path


def make_adapter(base_path: Path, path: Path, seed: int) -> Path:
    base = load_base(base_path)
    model = TCURLoRAModel(base.model, TCURLoRAConfig(rank=RANK))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in model.groups.values():
            group.u.add_(0.1 * group.u.abs().mean() * torch.randn(group.u.shape, generator=generator))
        for name, parameter in model.base.named_parameters():
            if name.startswith("decoder"):
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    card = AdapterCard(name=path.stem, base_fingerprint=base.card.fingerprint, base_name=base.card.name, rank=RANK,
                       groups=list(model.groups), init="pinv", labels=LABELS,
                       training={"cases": 0, "steps": 0, "seconds": 0.0, "device": "cpu", "seed": seed})
    save_adapter(path, model, card, include_head=False)
    return path


def make_volume() -> tuple[np.ndarray, volumes.Geometry]:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in VOLUME_SHAPE], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    image = np.where(radius < 0.9, 100 - 40 * radius, 0).astype(np.float32)
    image[radius < 0.9] += rng.normal(0, 5, int(np.count_nonzero(radius < 0.9))).astype(np.float32)
    geometry = volumes.Geometry(tuple(reversed(VOLUME_SHAPE)), VOLUME_SPACING, (-80.0, -96.0, -80.0), np.eye(3))
    return image, geometry


def rounds(runs: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run over ``repeats`` rounds; the order within a round rotates so neither always goes first."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def timed(action: Callable[[], object], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return seconds


def row(name: str, values: list[float], unit: float = 1.0, digits: int = 3) -> str:
    return (f"| {name} | {statistics.median(values) * unit:.{digits}f} | {min(values) * unit:.{digits}f} | "
            f"{len(values)} |")


def ratio_row(name: str, seconds: dict[str, list[float]], note: str) -> str:
    median = statistics.median(seconds["merged"]) / statistics.median(seconds["base"])
    return f"| {name} | {median:.3f} | {min(seconds['merged']) / min(seconds['base']):.3f} | {note} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img", type=int, choices=(64, 96), default=64, help="UNETR input size (default 64)")
    parser.add_argument("--spacing", type=float, default=1.5, help="card spacing in mm (default 1.5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        base_path = make_base(folder, args.img, args.spacing)
        adapters = [make_adapter(base_path, folder / f"adapter{i}.safetensors", seed=i) for i in (1, 2)]
        image, geometry = make_volume()
        plain = load_base(base_path, args.device)
        session = AdaptedUNETR(load_base(base_path, args.device))
        session.set_adapter(adapters[0])

        model_grid = volumes.model_grid_for(geometry, [args.spacing] * 3, "RAS")
        windows = count_windows(model_grid.shape, [args.img] * 3, OVERLAP)
        window = torch.randn(1, 1, args.img, args.img, args.img, device=args.device)

        def forward(network: torch.nn.Module) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    network(window)
                if window.is_cuda:
                    torch.cuda.synchronize()
            return run

        def segmentation(model: object) -> Callable[[], None]:
            return lambda: segment_volume(image, geometry, model, overlap=OVERLAP, device=args.device)

        forwards = rounds({"base": forward(plain.model), "merged": forward(session.model)}, 1, args.repeats * 2)
        segments = rounds({"base": segmentation(plain), "merged": segmentation(session)}, 1, args.repeats)
        same = np.array_equal(segment_volume(image, geometry, plain, device=args.device).labels,
                              segment_volume(image, geometry, AdaptedUNETR(plain), device=args.device).labels)

        switches = {"none -> adapter": [], "adapter -> other adapter": [], "adapter -> none": []}
        session.set_adapter(None)
        for _ in range(args.repeats):
            switches["none -> adapter"] += timed(lambda: session.set_adapter(adapters[0]), 1)
            switches["adapter -> other adapter"] += timed(lambda: session.set_adapter(adapters[1]), 1)
            switches["adapter -> none"] += timed(lambda: session.set_adapter(None), 1)

    lines = [
        f"Compact UNETR (hidden 192, MLP 768, 6 heads, feature_size 16, img {args.img}^3), rank-{RANK} adapter on "
        f"all three groups; volume {VOLUME_SHAPE[2]} x {VOLUME_SHAPE[1]} x {VOLUME_SHAPE[0]} at 1 mm -> model grid "
        f"{' x '.join(map(str, model_grid.size))} at {args.spacing} mm, {windows} windows (overlap {OVERLAP}). "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device "
        f"{args.device}, torch {torch.__version__}.",
        "",
        "| segmentation | median s | fastest s | runs |",
        "|---|---|---|---|",
        row("base alone", segments["base"]),
        row("adapter merged", segments["merged"]),
        ratio_row("**ratio merged / base**", segments, "goal <= 1.02"),
        row("one window forward, base", forwards["base"]),
        row("one window forward, merged", forwards["merged"]),
        ratio_row("ratio merged / base (forward)", forwards, ""),
        "",
        f"Session without adapter gives the base's labels exactly: {same}.",
        "",
        "| set_adapter | median ms | fastest ms | runs |",
        "|---|---|---|---|",
        *[row(name, values, 1000, 1) for name, values in switches.items()],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
