"""Support of the Slicer self-tests: a runner that reports a skipped test as skipped, not as a failure; an import
check in a fresh interpreter; a synthetic training case and a tiny base model.

Slicer calls ``<Module>Test().runTest()`` directly (``ScriptedLoadableModule.runTest``, behind *Reload and Test*
and the SelfTests module), not through unittest's runner: a ``unittest.SkipTest`` raised there is an exception like
any other, and *Reload and Test* shows "Reload and Test failed". ctest (``slicer_add_python_unittest``) loads the
same class with unittest's loader instead, which runs every ``test_`` method and counts a SkipTest as a skip.
:func:`run_tests` gives ``runTest`` the second behaviour.
"""
from __future__ import annotations

import os
import subprocess
import textwrap
import unittest
from typing import Callable, Sequence

__all__ = ["BLOCKED", "imports_without", "run_tests", "synthetic_case", "tiny_base_from_checkout"]

BLOCKED = ("torch", "monai", "numpy")
"""What the panels must import without: PyTorch and MONAI come later, and numpy stays out too."""


def run_tests(case: unittest.TestCase, names: Sequence[str], report: Callable[[str], None] = print) -> list[str]:
    """Runs the named test methods of ``case``, each between ``setUp`` and ``tearDown``.

    A test that raises :class:`unittest.SkipTest` is reported (``"<name> skipped: <reason>"``) and the next one
    runs; any other exception propagates at once (a failure).

    Returns:
        The reports of the skipped tests, in order (empty when every test ran).
    """
    skipped = []
    for name in names:
        case.setUp()
        try:
            getattr(case, name)()
        except unittest.SkipTest as skip:
            skipped.append(f"{name} skipped: {skip}")
            report(skipped[-1])
        finally:
            case.tearDown()
    return skipped


_IMPORT_CHECK = """
import importlib, importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked by the import check", name=name)
        return None

sys.meta_path.insert(0, Blocker())
sys.path.insert(0, {folder!r})
for module in {modules!r}:
    importlib.import_module(module)
print("imported", len({modules!r}), "modules without", {blocked!r})
"""


def imports_without(python: str, modules: Sequence[str], folder: str | os.PathLike,
                    blocked: Sequence[str] = BLOCKED) -> tuple[bool, str]:
    """Imports ``modules`` in a fresh ``python`` in which ``blocked`` packages (and their submodules) raise
    ModuleNotFoundError, with ``folder`` first on ``sys.path``.

    A fresh process, because in the current one torch may be imported already, and a blocker cannot un-import it.

    Returns:
        ``(succeeded, output)``: the child's exit status and its standard output and error (the traceback).
    """
    code = textwrap.dedent(_IMPORT_CHECK).format(blocked=tuple(blocked), folder=os.fspath(folder),
                                                 modules=list(modules))
    done = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          encoding="utf-8", errors="replace", check=False)
    return done.returncode == 0, done.stdout


def synthetic_case(scene, seed: int, segment_name: str, shape: tuple[int, int, int] = (24, 28, 32)):
    """A training case in ``scene``: a bright blob on noise (2 mm voxels) and a segmentation of the blob.

    Made with MRML calls alone (Slicer's or the ``slicer-core`` wheel's), for the Train self-test.

    Args:
        scene: a ``vtkMRMLScene``.
        seed: moves the blob by up to 3 voxels and draws the noise.
        segment_name: the name of the one segment.
        shape: the (k, j, i) size of the volume.

    Returns:
        ``(volume node, segmentation node)``.
    """
    import numpy as np
    import slicer
    import vtk
    from vtk.util import numpy_support

    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    centre = np.array(shape) // 2 + rng.integers(-3, 4, 3)
    blob = sum((grid[axis] - centre[axis]) ** 2 for axis in range(3)) < 36
    image = (rng.normal(0, 5, shape) + 100 * blob).astype(np.float32)
    nodes = []
    for class_name, name, voxels in (("vtkMRMLScalarVolumeNode", f"case{seed}", image),
                                     ("vtkMRMLLabelMapVolumeNode", f"blob{seed}", blob.astype(np.uint8))):
        data = vtk.vtkImageData()
        data.SetDimensions(shape[2], shape[1], shape[0])
        data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=True))
        node = scene.AddNewNodeByClass(class_name, name)
        node.SetAndObserveImageData(data)
        node.SetSpacing(2.0, 2.0, 2.0)
        nodes.append(node)
    volume, labelmap = nodes
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels{seed}")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation):
        raise RuntimeError("the blob could not be imported as a segment")
    segmentation.GetSegmentation().GetNthSegment(0).SetName(segment_name)
    scene.RemoveNode(labelmap)
    return volume, segmentation


def tiny_base_from_checkout(engine_folder: str | os.PathLike, folder: str | os.PathLike) -> str | None:
    """A tiny base model made by ``Testing/synthetic.py`` of a source checkout (needs torch and MONAI) in
    ``folder``, or None where there is no checkout (an installed extension)."""
    import importlib
    import sys

    testing = os.path.normpath(os.path.join(os.fspath(engine_folder), os.pardir, "Testing"))
    if not os.path.isfile(os.path.join(testing, "synthetic.py")):
        return None
    if testing not in sys.path:
        sys.path.insert(0, testing)
    path = os.path.join(os.fspath(folder), "tiny_base.safetensors")
    importlib.import_module("synthetic").make_tiny_base(path)
    return path
