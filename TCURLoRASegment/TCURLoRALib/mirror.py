"""Left/right mirroring of a training case on the model grid, with the labels of each left/right pair swapped.

A brain mirrored across its left-right axis is another plausible brain, so a flip doubles few-shot training data,
but only if what was the *left* hippocampus is relabelled *right* once it lies on the patient's right: without the
swap a flip teaches the network that either side may carry either label. This is why ``train`` never flipped.

Which array axis to flip: model-grid arrays are (z, y, x) = (k, j, i) of a grid whose orientation code (the card's,
e.g. ``"RAS"``) names, letter by letter, the direction toward which image axes x, y, z increase. The axis whose
letter is R or L runs along the patient's left-right direction; its array axis is ``2 - position`` of that letter.
For an oblique input the model grid is only permuted and flipped (``volumes.prepare_for_model``), so the flip is
along the grid axis nearest to left-right.

Pairs are given as channel indices (the model-grid targets hold channel indices, ``cases.IGNORE_INDEX`` where not
annotated, which a mirror keeps); :func:`pairs_from_names` finds them from label names that differ only by a
left/right word. Torch-free: numpy only.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence, Tuple

import numpy as np

__all__ = ["Pair", "check_pairs", "left_right_axis", "mirror", "mirrored_cases", "pairs_from_names",
           "required_pairs", "swap_pairs"]

Pair = Tuple[int, int]
_SIDE_WORDS = {"left": "right", "right": "left", "l": "r", "r": "l", "lh": "rh", "rh": "lh"}
_TOKENS = re.compile(r"[A-Za-z]+|[0-9]+|[^A-Za-z0-9]+")


def left_right_axis(orientation: str) -> int:
    """The array axis ((z, y, x) order) along the patient's left-right direction on a grid of `orientation`.

    Args:
        orientation: three-letter code, one of each pair R/L, A/P, S/I (e.g. ``"RAS"``: x toward the right, so
            array axis 2; ``"SAR"``: the third image axis is left-right, so array axis 0).

    Raises:
        ValueError: not such a code.
    """
    code = orientation.upper() if isinstance(orientation, str) else ""
    pairs = ("RL", "AP", "SI")
    if len(code) != 3 or sorted(next((i for i, p in enumerate(pairs) if c in p), -1) for c in code) != [0, 1, 2]:
        raise ValueError(f"orientation must be 3 letters, one of each of R/L, A/P, S/I (like 'RAS'), got "
                         f"{orientation!r}")
    return 2 - next(position for position, letter in enumerate(code) if letter in "RL")


def check_pairs(pairs: Sequence[Sequence[int]], n_channels: int) -> list[Pair]:
    """The pairs as a list of int tuples, checked.

    Raises:
        ValueError: a pair that is not two distinct foreground channels (1..n_channels-1), or a channel in two pairs.
    """
    checked: list[Pair] = []
    seen: set = set()
    for pair in pairs:
        items = tuple(pair)
        if len(items) != 2 or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in items):
            raise ValueError(f"a left/right pair must be two channel indices, got {pair!r}")
        a, b = int(items[0]), int(items[1])
        if a == b or not (0 < a < n_channels and 0 < b < n_channels):
            raise ValueError(f"left/right pair {pair!r}: needs two different foreground channels in "
                             f"1..{n_channels - 1}")
        if a in seen or b in seen:
            raise ValueError(f"left/right pair {pair!r}: channel {a if a in seen else b} is already in another pair")
        seen.update((a, b))
        checked.append((a, b))
    return checked


def swap_pairs(target: np.ndarray, pairs: Sequence[Pair]) -> np.ndarray:
    """A copy of `target` (channel indices, any shape) with the two channels of every pair exchanged."""
    out = np.array(target, copy=True)
    for a, b in pairs:
        out[target == a] = b
        out[target == b] = a
    return out


def mirror(image: np.ndarray, target: np.ndarray, orientation: str, pairs: Sequence[Sequence[int]],
           n_channels: int) -> tuple:
    """Mirror one case across the patient's left-right axis and swap the labels of each left/right pair.

    The flip is about the centre of the array (not the brain's mid-plane): crops are local, so where the mirrored
    brain sits in the volume does not matter for training.

    Args:
        image: float (D, H, W) = (z, y, x) on the model grid.
        target: int (D, H, W), channel indices or ``IGNORE_INDEX`` (kept).
        orientation: the model grid's orientation code (the base card's).
        pairs: (left channel, right channel) of each pair; channels in no pair keep their index.
        n_channels: number of output channels (background included), for checking the pairs.

    Returns:
        (image, target): new contiguous arrays, same shapes and dtypes.

    Raises:
        ValueError: image and target of different shapes, not 3-D, a bad orientation or bad pairs.
    """
    image, target = np.asarray(image), np.asarray(target)
    if image.ndim != 3 or image.shape != target.shape:
        raise ValueError(f"image and target must be 3-D arrays of one shape, got {image.shape} and {target.shape}")
    axis = left_right_axis(orientation)
    checked = check_pairs(pairs, n_channels)
    flipped_image = np.ascontiguousarray(np.flip(image, axis))
    flipped_target = swap_pairs(np.ascontiguousarray(np.flip(target, axis)), checked)
    return flipped_image, flipped_target


def pairs_from_names(names: Sequence[str]) -> list[Pair]:
    """Left/right pairs among label names (channel = position in `names`): names equal but for one side word.

    Side words are whole tokens, case-insensitive: left/right, l/r, lh/rh (``"left hippocampus"`` /
    ``"right hippocampus"``, ``"Left-Putamen"`` / ``"Right-Putamen"``, ``"Hippocampus_L"`` / ``"Hippocampus_R"``).
    Pairs come as (channel named left, channel named right), in channel order; a name with no twin is in no pair.

    Raises:
        ValueError: a name whose twin appears more than once (the pairing would be ambiguous).
    """
    folded = [name.casefold() for name in names]
    pairs: list[Pair] = []
    for index, name in enumerate(folded):
        tokens = _TOKENS.findall(name)
        for position, token in enumerate(tokens):
            if token not in ("left", "l", "lh"):
                continue
            twin = "".join(tokens[:position] + [_SIDE_WORDS[token]] + tokens[position + 1:])
            matches = [other for other, candidate in enumerate(folded) if candidate == twin]
            if len(matches) > 1:
                raise ValueError(f"label {names[index]!r} has {len(matches)} right-side twins named {twin!r}")
            if matches:
                pairs.append((index, matches[0]))
                break
    return pairs


def required_pairs(names: Sequence[str], declared: Sequence[Pair] | None, option: str) -> list[Pair]:
    """The left/right pairs an option that mirrors needs: the declared ones (an adapter card's ``anatomy``), else
    those found in the label names.

    Args:
        names: label names, channel order (background first).
        declared: (left, right) channel pairs a card declares, or None to find them from ``names``.
        option: the option that asked (``"--mirror"``), for the message.

    Raises:
        ValueError: no pair at all. A flip without a swap would teach (or, at test time, average) a left label on
            the right side, so mirroring is refused rather than run without pairs.
    """
    pairs = list(declared) if declared is not None else pairs_from_names(names)
    if not pairs:
        raise ValueError(f"{option} needs left/right label pairs, and the labels {list(names[1:])} hold none: name "
                         f"each pair 'left X' / 'right X' (or 'X_L' / 'X_R'), or leave {option} out")
    return pairs


def mirrored_cases(cases: Sequence, orientation: str, pairs: Sequence[Pair], n_channels: int) -> list:
    """Each case (:class:`~TCURLoRALib.cases.PreparedCase`) mirrored by :func:`mirror`, named ``<name>-mirrored``."""
    return [dataclasses.replace(case, name=f"{case.name}-mirrored",
                                **dict(zip(("image", "target"), mirror(case.image, case.target, orientation, pairs,
                                                                       n_channels))))
            for case in cases]
