"""Static checks of the Slicer side of the extension, run without Slicer.

Slicer cannot run here, so these tests read the module files and their shared qt helpers (TCURLoRAGui) as Python
syntax trees, the Qt Designer .ui files (XML) and the CMakeLists (a small tokenizer) and check what Slicer relies on
at load, build, test and packaging time: class names and bases, widget names, the parameter-node wrapper's API,
Python 3.9 syntax, files listed for installation and copied into the build tree, icons and URLs, and that the
engine is imported in one place only (test_panel_logic.py imports those statements without torch, MONAI and numpy).
"""
from __future__ import annotations

import ast
import shlex
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULES = ("TCURLoRASegment", "TCURLoRATrain")
ENGINE_MODULE = "TCURLoRASegment"  # the module whose folder holds the engine package and the qt helpers
ENGINE_PACKAGE = "TCURLoRALib"
GUI_PACKAGE = "TCURLoRAGui"
GUI_FILE = REPO_ROOT / ENGINE_MODULE / GUI_PACKAGE / "__init__.py"
PANELS = f"{ENGINE_PACKAGE}.panels"
# Importing any of these at module load would import torch at Slicer startup, or fail before it is installed.
LAZY_IMPORTS = {"torch", "monai", "numpy"}
# Slicer 5.8.0's parameterNodeWrapper (tag v5.8.0, commit d20ee94ceeaf3da1d67042059c6c125c82626005,
# Base/Python/slicer/parameterNodeWrapper/wrapper.py): _processClass puts these on a @parameterNodeWrapper class,
# _initMethod these on an instance, and every field X adds the property X and the attribute _X_impl. Nothing else
# exists on a wrapper: GetNode() does not (issue 11, finding 1); the MRML node itself is `.parameterNode`.
WRAPPER_CLASS_ATTRIBUTES = {
    "allParameters", "_is_parameter_node_wrapper", "default", "isCached", "dataType", "getValue", "setValue",
    "connectGui", "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver",
    "RemoveObserver", "Modified",
}
WRAPPER_INSTANCE_ATTRIBUTES = {"parameterNode", "_parameterGUIs", "_nextParameterGUIsTag",
                               "_updatingGUIFromParameterNode"}
# Self-tests must never install anything (issue 11, finding 5): none of these may be called from a Test class.
INSTALLERS = {"ensureDependencies", "installDependencies", "ensure_dependencies", "pip_install", "installTorch"}
MAX_MODULE_LINES = 400
MAX_SLOT_LINES = 12
SLICER_BASES = {
    "{module}": {"ScriptedLoadableModule"},
    "{module}Widget": {"ScriptedLoadableModuleWidget", "VTKObservationMixin"},
    "{module}Logic": {"ScriptedLoadableModuleLogic"},
    "{module}Test": {"ScriptedLoadableModuleTest"},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ICON_SIZE = (128, 128)


# ----------------------------------------------------------------------------- helpers


def _module_path(module: str) -> Path:
    return REPO_ROOT / module / f"{module}.py"


def _parse_module(module: str) -> ast.Module:
    path = _module_path(module)
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _top_level_classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _name_of(node: ast.expr) -> str:
    """``Foo`` and ``pkg.Foo`` both give ``"Foo"``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name_of(node.func)
    return ast.dump(node)


def _methods(classdef: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in classdef.body if isinstance(node, ast.FunctionDef)}


def _import_time_nodes(tree: ast.Module):
    """Yields every node executed when the module is imported: all but the bodies of functions and lambdas."""
    deferred = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    pending = [node for node in tree.body if not isinstance(node, deferred)]
    while pending:
        node = pending.pop()
        yield node
        pending.extend(child for child in ast.iter_child_nodes(node) if not isinstance(child, deferred))


def _imported_top_names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return {node.module.split(".")[0]}
    return set()


def _ui_path(module: str) -> Path:
    return REPO_ROOT / module / "Resources" / "UI" / f"{module}.ui"


def _ui_widgets(module: str) -> list[ElementTree.Element]:
    return list(ElementTree.parse(_ui_path(module)).getroot().iter("widget"))


def _ui_attributes_used(tree: ast.Module) -> set[str]:
    """Names ``X`` of every ``self.ui.X`` and ``ui.X`` (a helper's ``ui`` argument) in the module."""
    used = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id == "ui":
            used.add(node.attr)
        elif (isinstance(value, ast.Attribute) and value.attr == "ui" and isinstance(value.value, ast.Name)
              and value.value.id == "self"):
            used.add(node.attr)
    return used


def _slicer_side_files() -> list[Path]:
    return [_module_path(module) for module in MODULES] + [GUI_FILE]


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _wrapper_fields(tree: ast.Module) -> dict[str, set[str]]:
    """Field names of each @parameterNodeWrapper class of a module."""
    return {node.name: {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
            for node in tree.body if isinstance(node, ast.ClassDef)
            and any(_name_of(decorator) == "parameterNodeWrapper" for decorator in node.decorator_list)}


def _is_wrapper(node: ast.expr, wrapper_names: set[str], classes: set[str]) -> bool:
    """Whether an expression holds a parameter-node wrapper: ``self._parameterNode``, ``X.getParameterNode()`` (not
    ``super().getParameterNode()``, the raw MRML node), ``<Wrapper class>(...)`` or a name bound to one of these."""
    if isinstance(node, ast.Name):
        return node.id in wrapper_names
    if isinstance(node, ast.Attribute):
        return node.attr == "_parameterNode" and isinstance(node.value, ast.Name) and node.value.id == "self"
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name):
            return func.id in classes
        if isinstance(func, ast.Attribute) and func.attr == "getParameterNode":
            return not (isinstance(func.value, ast.Call) and _name_of(func.value.func) == "super")
    return False


def wrapper_attribute_violations(tree: ast.Module, fields: set[str], classes: set[str]) -> list[str]:
    """``"line: .attr"`` for every attribute used on a parameter-node wrapper that Slicer 5.8's wrapper lacks."""
    allowed = fields | {f"_{field}_impl" for field in fields} | WRAPPER_CLASS_ATTRIBUTES | WRAPPER_INSTANCE_ATTRIBUTES
    violations = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = {arg.arg for arg in function.args.args + function.args.kwonlyargs if arg.annotation is not None
                 and (arg.annotation.value if isinstance(arg.annotation, ast.Constant) else _name_of(arg.annotation))
                 in classes}
        for node in ast.walk(function):  # bindings first, in source order (good enough for these short methods)
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple)
                             and isinstance(node.value, ast.Tuple) else [(target, node.value)])
                    names |= {t.id for t, v in pairs if isinstance(t, ast.Name) and _is_wrapper(v, names, classes)}
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute) and _is_wrapper(node.value, names, classes) and node.attr not in allowed:
                violations.append(f"{node.lineno}: .{node.attr}")
    return sorted(set(violations))


def _cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Splits a CMakeLists into ``(command name in lower case, arguments)`` in file order.

    Handles comments, quoted arguments and ``${VAR}`` references, which is all these files use.
    """
    lexer = shlex.shlex(path.read_text(encoding="utf-8"), posix=True, punctuation_chars="()")
    lexer.whitespace_split = True
    tokens = []
    for token in lexer:
        # shlex groups runs of punctuation ("()"); CMake needs each parenthesis on its own.
        tokens.extend(token if set(token) <= set("()") else [token])
    commands = []
    index = 0
    while index < len(tokens):
        name = tokens[index]
        if index + 1 >= len(tokens) or tokens[index + 1] != "(":
            raise ValueError(f"{path}: expected '(' after {name!r}")
        depth, index, arguments = 1, index + 2, []
        while depth:
            token = tokens[index]
            depth += {"(": 1, ")": -1}.get(token, 0)
            if depth:
                arguments.append(token)
            index += 1
        commands.append((name.lower(), arguments))
    return commands


def _cmake_set(commands: list[tuple[str, list[str]]], variable: str) -> list[str]:
    values = [arguments[1:] for name, arguments in commands if name == "set" and arguments[:1] == [variable]]
    assert len(values) == 1, f"set({variable} ...) must appear exactly once, found {len(values)}"
    return values[0]


def _module_cmake(module: str) -> tuple[list[tuple[str, list[str]]], list[str], list[str]]:
    """Returns the commands of a module's CMakeLists and its SCRIPTS and RESOURCES with ${MODULE_NAME} expanded."""
    commands = _cmake_commands(REPO_ROOT / module / "CMakeLists.txt")
    (name,) = _cmake_set(commands, "MODULE_NAME")

    def expand(values: list[str]) -> list[str]:
        return [value.replace("${MODULE_NAME}", name) for value in values]

    scripts = expand(_cmake_set(commands, "MODULE_PYTHON_SCRIPTS"))
    resources = expand(_cmake_set(commands, "MODULE_PYTHON_RESOURCES"))
    return commands, scripts, resources


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR", f"{path}: first PNG chunk is {data[12:16]!r}, not IHDR"
    return struct.unpack(">II", data[16:24])


def _load_function(module: str, function: str, module_file: Path) -> object:
    """Compiles one top-level function of a module file (with its string constants) as if loaded from module_file."""
    tree = _parse_module(module)
    keep = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name == function)
        or (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant))
        or (isinstance(node, ast.ImportFrom) and node.module == "__future__")
        or (isinstance(node, ast.Import) and _imported_top_names(node) <= {"os", "sys"})
    ]
    namespace = {"__file__": str(module_file)}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(_module_path(module)), "exec"), namespace)
    return namespace[function]


# ----------------------------------------------------------------------------- module files


@pytest.mark.parametrize("module", MODULES)
def test_module_file_compiles(module):
    path = _module_path(module)
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("pattern", sorted(SLICER_BASES))
def test_slicer_classes_have_conventional_names_and_bases(module, pattern):
    classes = _top_level_classes(_parse_module(module))
    name = pattern.format(module=module)
    assert name in classes, f"{module}.py lacks class {name}; Slicer finds the module's classes by these names"
    bases = {_name_of(base) for base in classes[name].bases}
    assert SLICER_BASES[pattern] <= bases, f"{name} derives from {sorted(bases)}, needs {sorted(SLICER_BASES[pattern])}"


@pytest.mark.parametrize("module", MODULES)
def test_module_metadata(module):
    init = _methods(_top_level_classes(_parse_module(module))[module])["__init__"]
    assigned = {}
    for node in ast.walk(init):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and _name_of(target.value) == "parent":
                    assigned[target.attr] = node.value
    for field in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert field in assigned, f"{module}.__init__ does not set self.parent.{field}"
    categories = assigned["categories"]
    assert isinstance(categories, ast.List) and len(categories.elts) == 1, "one category expected"
    strings = {node.value for node in ast.walk(categories) if isinstance(node, ast.Constant)}
    assert "Segmentation" in strings, f"category must be Segmentation, found {sorted(strings)}"


@pytest.mark.parametrize("path", _slicer_side_files(), ids=lambda path: path.parent.name)
def test_torch_monai_and_numpy_are_not_imported_at_load(path):
    eager = set()
    for node in _import_time_nodes(_parse(path)):
        eager |= _imported_top_names(node) & LAZY_IMPORTS
    assert not eager, f"{path.name} imports {sorted(eager)} at load time; import them inside the method that needs them"


@pytest.mark.parametrize("path", _slicer_side_files(), ids=lambda path: path.parent.name)
def test_the_engine_is_imported_in_one_place_through_the_panels_layer(path):
    """One ``from TCURLoRALib.panels import ...`` at the top, nothing of the engine anywhere else (the lead's lazy
    public API can then replace it in one place)."""
    tree = _parse(path)
    engine_imports = [node for node in ast.walk(tree) if ENGINE_PACKAGE in _imported_top_names(node)
                      or (isinstance(node, ast.Import) and any(a.name.startswith(ENGINE_PACKAGE) for a in node.names))]
    assert len(engine_imports) == 1, [ast.dump(node) for node in engine_imports]
    (statement,) = engine_imports
    assert statement in tree.body and isinstance(statement, ast.ImportFrom) and statement.module == PANELS
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "cli"]


def test_lazy_import_check_detects_a_top_level_import():
    """The walker behind the previous test sees imports nested in if/try/class bodies, and skips functions."""
    tree = ast.parse(
        "import os\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\n"
        "class A:\n    from monai import networks\n"
        "def f():\n    import TCURLoRALib\n"
    )
    found = set().union(*(_imported_top_names(node) for node in _import_time_nodes(tree)))
    assert found == {"os", "torch", "monai"}


@pytest.mark.parametrize("module", MODULES)
def test_widget_loads_its_ui_file_the_slicer_way(module):
    widget = _top_level_classes(_parse_module(module))[f"{module}Widget"]
    setup = _methods(widget)["setup"]
    calls = {_name_of(node.func) for node in ast.walk(setup) if isinstance(node, ast.Call)}
    assert {"loadUI", "childWidgetVariables", "setMRMLScene", "resourcePath"} <= calls
    constants = {node.value for node in ast.walk(setup) if isinstance(node, ast.Constant)}
    assert f"UI/{module}.ui" in constants, f"{module}Widget.setup must load Resources/UI/{module}.ui"


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_widget_used_by_the_module_exists_in_its_ui_file(module):
    names = {widget.get("name") for widget in _ui_widgets(module)}
    missing = _ui_attributes_used(_parse_module(module)) - names
    assert not missing, f"{module}.py uses self.ui.{sorted(missing)} but {_ui_path(module).name} has no such widget"


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_widget_the_shared_helpers_use_exists_in_both_panels(module):
    used = _ui_attributes_used(_parse(GUI_FILE))
    assert {"progressBar", "statusLabel", "logTextEdit", "checkEngineButton"} <= used
    missing = used - {widget.get("name") for widget in _ui_widgets(module)}
    assert not missing, f"TCURLoRAGui uses ui.{sorted(missing)} but {_ui_path(module).name} has no such widget"


def test_the_ui_attribute_finder_sees_self_ui_and_ui_arguments():
    tree = ast.parse("def f(self, ui):\n    self.ui.a.text = ui.b.text + other.ui.c\n")
    assert _ui_attributes_used(tree) == {"a", "b"}


# ----------------------------------------------------------------------------- the parameter-node wrapper


@pytest.mark.parametrize("path", _slicer_side_files(), ids=lambda path: path.parent.name)
def test_only_attributes_that_slicers_wrapper_defines_are_used_on_it(path):
    fields: set[str] = set()
    classes: set[str] = set()
    for module in MODULES:
        wrappers = _wrapper_fields(_parse_module(module))
        classes |= set(wrappers)
        fields |= set().union(*wrappers.values())
    if path != GUI_FILE:  # a module file's wrapper has its own fields only; the shared helpers may meet either
        fields = set().union(*_wrapper_fields(_parse(path)).values())
    assert wrapper_attribute_violations(_parse(path), fields, classes) == []


def test_the_wrapper_check_catches_getnode_and_unknown_fields():
    """The check that would have caught finding 1: NodeModify(p.GetNode()) on a wrapper."""
    tree = ast.parse(
        "def onAddCase(self):\n"
        "    p = self._parameterNode\n"
        "    with slicer.util.NodeModify(p.GetNode()):\n"
        "        p.caseVolumes.append(p.trainingVolume)\n"
        "def logic(parameterNode: 'W', other):\n"
        "    q, n = parameterNode, 3\n"
        "    q.StartModify(); q.nosuchfield; other.GetNode(); super().getParameterNode().GetNode()\n"
        "    W(node).GetParameter('x'); self.logic.getParameterNode().parameterNode.GetNode()\n")
    assert wrapper_attribute_violations(tree, {"caseVolumes", "trainingVolume"}, {"W"}) == [
        "3: .GetNode", "7: .nosuchfield", "8: .GetParameter"]


def test_train_parameter_node_defaults_come_from_the_panels_settings():
    """The Train panel's defaults are settings.train_defaults() (test_panel_logic.py checks those against the
    engine's), never numbers written into the module file."""
    tree = _parse_module("TCURLoRATrain")
    assigned = {node.targets[0].id: ast.unparse(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    assert assigned["TRAIN_DEFAULTS"] == "settings.train_defaults()"
    (wrapper,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "TCURLoRATrainParameterNode"]
    defaults = {item.target.id: ast.unparse(call.args[0]) for item in wrapper.body if isinstance(item, ast.AnnAssign)
                for call in ast.walk(item.annotation) if isinstance(call, ast.Call) and _name_of(call.func) == "Default"}
    assert defaults == {"rank": "TRAIN_DEFAULTS.rank", "steps": "TRAIN_DEFAULTS.steps",
                        "learningRate": "TRAIN_DEFAULTS.lr", "minutes": "TRAIN_DEFAULTS.minutes",
                        "mirror": "TRAIN_DEFAULTS.mirror"}


@pytest.mark.parametrize("module", MODULES)
def test_parameter_node_annotations_evaluate_on_python_3_9(module):
    """Slicer's wrapper evaluates the annotations (typing.get_type_hints): ``X | None`` fails on Slicer 5.8's 3.9."""
    (wrapper,) = [node for node in _parse_module(module).body if isinstance(node, ast.ClassDef)
                  and any(_name_of(d) == "parameterNodeWrapper" for d in node.decorator_list)]
    unions = [item.target.id for item in wrapper.body if isinstance(item, ast.AnnAssign)
              and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(item.annotation))]
    assert not unions, f"use Optional[...] in {wrapper.name}: {unions}"


def test_slicer_side_and_engine_parse_as_python_3_9():
    """Slicer 5.8 ships Python 3.9: no syntax of a later Python anywhere Slicer imports."""
    files = [*_slicer_side_files(), *(REPO_ROOT / ENGINE_MODULE / ENGINE_PACKAGE).rglob("*.py")]
    for path in files:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_no_protected_qt_method_is_called():
    """QAbstractItemView.selectedIndexes() is protected in Qt: use the selection model (finding 10)."""
    for path in _slicer_side_files():
        calls = {_name_of(node.func) for node in ast.walk(_parse(path)) if isinstance(node, ast.Call)}
        assert "selectedIndexes" not in calls, path


def test_learning_rate_spin_box_steps_in_proportion_to_its_value():
    """Finding 10: a QDoubleSpinBox steps by 1.0 by default, useless for 1e-4..1e-1; the adaptive decimal step
    type steps by one power of ten below the value (0.001 at 0.01)."""
    (spin,) = [w for w in _ui_widgets("TCURLoRATrain") if w.get("name") == "learningRateSpinBox"]
    properties = {p.get("name"): p for p in spin.findall("property")}
    assert properties["stepType"].findtext("enum") == "QAbstractSpinBox::AdaptiveDecimalStepType"


@pytest.mark.parametrize("module", MODULES)
def test_module_files_are_thin_and_their_slots_short(module):
    path = _module_path(module)
    assert len(path.read_text(encoding="utf-8").splitlines()) < MAX_MODULE_LINES
    for classdef in [*_top_level_classes(_parse_module(module)).values(), *_top_level_classes(_parse(GUI_FILE)).values()]:
        for name, method in _methods(classdef).items():
            body = method.body[1:] if ast.get_docstring(method) is not None else method.body
            if name.startswith("on"):
                lines = body[-1].end_lineno - body[0].lineno + 1
                assert lines <= MAX_SLOT_LINES, f"{classdef.name}.{name} has {lines} lines: move its decisions out"


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_root_is_a_mrml_widget_named_after_the_module(module):
    root = ElementTree.parse(_ui_path(module)).getroot()
    assert root.findtext("class") == module
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", module)


@pytest.mark.parametrize("module", MODULES)
def test_every_node_selector_receives_the_scene(module):
    """uiWidget.setMRMLScene reaches a node selector only through a mrmlSceneChanged connection in the .ui."""
    root = ElementTree.parse(_ui_path(module)).getroot()
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == module
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors, f"{module}.ui has no node selector"
    assert selectors <= connected, f"selectors without the scene: {sorted(selectors - connected)}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_parameter_names_are_parameter_node_fields(module):
    classes = _top_level_classes(_parse_module(module))
    wrappers = [c for c in classes.values() if any(_name_of(d) == "parameterNodeWrapper" for d in c.decorator_list)]
    assert len(wrappers) == 1, f"{module}.py needs one @parameterNodeWrapper class, found {len(wrappers)}"
    fields = {node.target.id for node in wrappers[0].body if isinstance(node, ast.AnnAssign)}
    bound = set()
    for widget in _ui_widgets(module):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.add(prop.findtext("string"))
    assert bound, f"{module}.ui binds no widget to the parameter node"
    assert bound <= fields, f"SlicerParameterName values {sorted(bound - fields)} are not fields of {wrappers[0].name}"


# Which widget classes Slicer 5.8.0's parameter-node GUI connectors bind to which field type
# (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py at v5.8.0, each connector's canRepresent): a field bound
# to a widget no connector represents raises when the panel opens, which only Slicer would show.
CONNECTOR_WIDGETS = {
    "int": {"QSpinBox", "QSlider", "QComboBox", "ctkComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
              "qMRMLSpinBox", "QComboBox", "ctkComboBox"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "QComboBox", "ctkComboBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit", "QComboBox", "ctkComboBox"},
    "enum": {"QComboBox", "ctkComboBox"},
    "node": {"qMRMLNodeComboBox"},
}
ENUM_FIELD_TYPES = {"Device"}


def _field_kind(annotation: ast.expr) -> str:
    """The connector kind of a wrapper field: ``Annotated[int, ...]`` is ``int``; ``vtkMRML...`` a node."""
    if isinstance(annotation, ast.Subscript) and _name_of(annotation.value) == "Annotated":
        return _field_kind(annotation.slice.elts[0])
    name = _name_of(annotation) if isinstance(annotation, (ast.Name, ast.Attribute)) else ast.unparse(annotation)
    if name.startswith("vtkMRML"):
        return "node"
    return "enum" if name in ENUM_FIELD_TYPES else name


@pytest.mark.parametrize("module", MODULES)
def test_every_bound_widget_is_one_a_slicer_connector_represents_for_its_field(module):
    classes = _top_level_classes(_parse_module(module))
    (wrapper,) = [c for c in classes.values() if any(_name_of(d) == "parameterNodeWrapper" for d in c.decorator_list)]
    kinds = {node.target.id: _field_kind(node.annotation) for node in wrapper.body if isinstance(node, ast.AnnAssign)}
    bound = {}
    for widget in _ui_widgets(module):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = (widget.get("class"), prop.findtext("string"))
    mismatched = [f"{name} ({cls}) -> {field}: {kinds[field]}" for name, (cls, field) in bound.items()
                  if cls not in CONNECTOR_WIDGETS.get(kinds[field], set())]
    assert not mismatched, f"no Slicer 5.8 connector binds these widgets to their fields: {mismatched}"
    assert {"int", "float", "bool"} & {kinds[field] for _, field in bound.values()}, "the check saw no plain field"


def test_the_connector_check_catches_a_spin_box_bound_to_a_float():
    assert _field_kind(ast.parse("Annotated[float, WithinRange(0, 1)]", mode="eval").body) == "float"
    assert "QSpinBox" not in CONNECTOR_WIDGETS["float"] and "QCheckBox" not in CONNECTOR_WIDGETS["int"]
    assert _field_kind(ast.parse("vtkMRMLScalarVolumeNode", mode="eval").body) == "node"


@pytest.mark.parametrize("module", MODULES)
def test_self_test_runs_every_test_method_through_the_skip_aware_runner(module):
    """runTest hands every test_ method to selftest.run_tests (a SkipTest is reported, not a failure)."""
    test_class = _top_level_classes(_parse_module(module))[f"{module}Test"]
    methods = _methods(test_class)
    assert "setUp" in methods and "runTest" in methods
    clears = [n for n in ast.walk(methods["setUp"]) if isinstance(n, ast.Call) and _name_of(n.func) == "Clear"]
    assert clears, "setUp must clear the scene"
    (call,) = [n for n in ast.walk(methods["runTest"]) if isinstance(n, ast.Call) and _name_of(n.func) == "run_tests"]
    names = ast.literal_eval(call.args[1])
    tests = {name for name in methods if name.startswith("test_")}
    assert tests and sorted(names) == sorted(tests), f"runTest runs {names}, the class has {sorted(tests)}"
    for name in tests | {"runTest"}:
        returns = [n for n in ast.walk(methods[name]) if isinstance(n, ast.Return)]
        assert not returns, f"{module}Test.{name} returns early (line {returns[0].lineno if returns else ''})"


@pytest.mark.parametrize("module", MODULES)
def test_self_tests_install_nothing(module):
    """In Slicer's headless runner an offline machine must skip, not fail: no installer is called (finding 5)."""
    test_class = _top_level_classes(_parse_module(module))[f"{module}Test"]
    called = {_name_of(node.func) for node in ast.walk(test_class) if isinstance(node, ast.Call)}
    assert not called & INSTALLERS, sorted(called & INSTALLERS)
    skips = [node for node in ast.walk(test_class) if isinstance(node, ast.Raise) and "SkipTest" in ast.dump(node)]
    assert skips, f"{module}Test never skips: what does it do without PyTorch?"


@pytest.mark.parametrize("module", MODULES)
def test_engine_folder_is_found_in_the_source_tree(module):
    find = _load_function(module, "_findEngineFolder", _module_path(module))
    assert Path(find()).resolve() == (REPO_ROOT / ENGINE_MODULE).resolve()


@pytest.mark.parametrize("module", MODULES)
def test_engine_folder_is_found_in_an_installed_extension(module, tmp_path):
    """Installed, both modules and the engine package share one qt-scripted-modules folder."""
    installed = tmp_path / "qt-scripted-modules"
    (installed / ENGINE_PACKAGE).mkdir(parents=True)
    (installed / ENGINE_PACKAGE / "__init__.py").write_text("")
    find = _load_function(module, "_findEngineFolder", installed / f"{module}.py")
    assert Path(find()) == installed


@pytest.mark.parametrize("module", MODULES)
def test_engine_folder_is_none_when_the_engine_is_missing(module, tmp_path):
    find = _load_function(module, "_findEngineFolder", tmp_path / "lonely" / f"{module}.py")
    assert find() is None


# ----------------------------------------------------------------------------- CMake and packaging


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_builds_a_scripted_module_with_tests(module):
    commands, scripts, _ = _module_cmake(module)
    assert _cmake_set(commands, "MODULE_NAME") == [module]
    assert scripts[0] == f"{module}.py"
    names = [name for name, _ in commands]
    (build,) = [arguments for name, arguments in commands if name == "slicermacrobuildscriptedmodule"]
    assert build[build.index("NAME") + 1] == "${MODULE_NAME}"
    assert build[build.index("SCRIPTS") + 1] == "${MODULE_PYTHON_SCRIPTS}"
    assert build[build.index("RESOURCES") + 1] == "${MODULE_PYTHON_RESOURCES}"
    assert "WITH_GENERIC_TESTS" in build
    start = commands.index(("if", ["BUILD_TESTING"]))
    unittest = commands.index(("slicer_add_python_unittest", ["SCRIPT", "${MODULE_NAME}.py"]))
    end = names.index("endif", start)
    assert start < unittest < end, "slicer_add_python_unittest must sit inside if(BUILD_TESTING)"


@pytest.mark.parametrize("package", [ENGINE_PACKAGE, GUI_PACKAGE])
def test_every_python_file_of_the_packages_is_listed_in_the_segment_module(package):
    """Slicer installs (and copies into the build tree) only listed files: an unlisted one is missing there."""
    _, scripts, _ = _module_cmake(ENGINE_MODULE)
    module_dir = REPO_ROOT / ENGINE_MODULE
    on_disk = {path.relative_to(module_dir).as_posix() for path in (module_dir / package).rglob("*.py")}
    assert f"{package}/__init__.py" in on_disk
    missing = on_disk - set(scripts)
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS of {ENGINE_MODULE}/CMakeLists.txt: {sorted(missing)}"


def _foreach_body(commands: list[tuple[str, list[str]]], variable: str) -> tuple[list[str], list]:
    """The items of ``foreach(<variable> items...)`` and the commands up to its ``endforeach``."""
    start = next(i for i, (name, args) in enumerate(commands) if name == "foreach" and args[:1] == [variable])
    depth, end = 0, start
    for end in range(start, len(commands)):
        depth += {"foreach": 1, "endforeach": -1}.get(commands[end][0], 0)
        if depth == 0:
            break
    return commands[start][1][1:], commands[start + 1:end]


BUILD_TREE = "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"
INSTALL_TREE = "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"


def test_shipped_models_and_sample_are_copied_into_the_build_tree_and_installed():
    """Finding 6: ctest runs the self-tests from the build tree, where paths.shipped_models_dir looks in
    <qt-scripted-modules>/Resources/Models (beside TCURLoRALib, which ctkMacroCompilePythonScript copies there)."""
    commands, _, _ = _module_cmake(ENGINE_MODULE)
    folders, body = _foreach_body(commands, "TCURLORA_DATA_DIR")
    assert folders == ["Models", "Samples"]
    copies = [args for name, args in body if name == "configure_file"]
    assert copies and copies[0][1] == f"{BUILD_TREE}/Resources/${{TCURLORA_DATA_DIR}}/${{TCURLORA_DATA_NAME}}"
    assert "COPYONLY" in copies[0]
    (install,) = [args for name, args in body if name == "install"]
    assert install[install.index("DESTINATION") + 1] == f"{INSTALL_TREE}/Resources/${{TCURLORA_DATA_DIR}}"
    for folder in folders:
        assert list((REPO_ROOT / "Resources" / folder).iterdir()), f"Resources/{folder} is empty"


def test_the_requirements_go_where_the_panels_look_in_the_build_tree_and_the_installation():
    commands, _, _ = _module_cmake(ENGINE_MODULE)
    (requirements,) = [args for name, args in commands if name == "set" and args[0] == "TCURLORA_REQUIREMENTS_FILE"]
    assert requirements[1] == "${CMAKE_CURRENT_SOURCE_DIR}/../Resources/requirements.txt"
    copies = [args for name, args in commands if name == "configure_file" and args[0] == "${TCURLORA_REQUIREMENTS_FILE}"]
    assert copies == [["${TCURLORA_REQUIREMENTS_FILE}", f"{BUILD_TREE}/Resources/requirements.txt", "COPYONLY"]]
    installs = [args for name, args in commands if name == "install" and args[1] == "${TCURLORA_REQUIREMENTS_FILE}"]
    assert installs[0][installs[0].index("DESTINATION") + 1] == f"{INSTALL_TREE}/Resources"


def test_the_build_tree_layout_is_where_the_engine_looks(tmp_path):
    """A qt-scripted-modules folder laid out as CMake builds it: the engine finds the models and the requirements."""
    import shutil
    import subprocess
    import sys

    tree = tmp_path / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    shutil.copytree(REPO_ROOT / ENGINE_MODULE / ENGINE_PACKAGE, tree / ENGINE_PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "Resources" / "Models").mkdir(parents=True)
    (tree / "Resources" / "requirements.txt").write_text("monai\n")
    code = ("from TCURLoRALib.paths import shipped_models_dir; from TCURLoRALib.panels.requirements import "
            "requirements_file; print(shipped_models_dir()); print(requirements_file(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", "import sys; " + code, str(tree)], cwd=tree, capture_output=True,
                          text=True, check=True, env={"PATH": "", "PYTHONPATH": str(tree)})
    assert done.stdout.split() == [str(tree / "Resources" / "Models"), str(tree / "Resources" / "requirements.txt")]


def test_engine_scripts_are_listed_in_sorted_order():
    _, scripts, _ = _module_cmake(ENGINE_MODULE)
    engine_scripts = [script for script in scripts if script.startswith(f"{ENGINE_PACKAGE}/")]
    assert engine_scripts == sorted(engine_scripts)


@pytest.mark.parametrize("module", MODULES)
def test_every_listed_file_exists(module):
    """slicerMacroBuildScriptedModule stops the build on a listed file that does not exist."""
    _, scripts, resources = _module_cmake(module)
    missing = [name for name in scripts + resources if not (REPO_ROOT / module / name).is_file()]
    assert not missing, f"{module}/CMakeLists.txt lists missing files: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_every_resource_file_is_listed(module):
    _, _, resources = _module_cmake(module)
    module_dir = REPO_ROOT / module
    on_disk = {p.relative_to(module_dir).as_posix() for p in (module_dir / "Resources").rglob("*") if p.is_file()}
    # Data files of the engine package are installed as resources too.
    engine_dir = module_dir / ENGINE_PACKAGE
    if engine_dir.is_dir():
        on_disk |= {
            p.relative_to(module_dir).as_posix()
            for p in engine_dir.rglob("*")
            if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
        }
    assert f"Resources/Icons/{module}.png" in on_disk and f"Resources/UI/{module}.ui" in on_disk
    missing = on_disk - set(resources)
    assert not missing, f"add to MODULE_PYTHON_RESOURCES of {module}/CMakeLists.txt: {sorted(missing)}"


def test_modules_install_no_file_twice():
    """Both modules install into one qt-scripted-modules folder: equal relative paths would overwrite each other."""
    seen = {}
    for module in MODULES:
        _, scripts, resources = _module_cmake(module)
        for name in scripts + resources:
            assert name not in seen, f"{name} is installed by both {seen.get(name)} and {module}"
            seen[name] = module


@pytest.mark.parametrize(
    "icon",
    [f"{module}/Resources/Icons/{module}.png" for module in MODULES] + ["Resources/TCURLoRA.png"],
)
def test_icons_are_128_pixel_pngs(icon):
    assert _png_size(REPO_ROOT / icon) == ICON_SIZE


def test_extension_cmake_declares_metadata_dependencies_and_modules():
    commands = _cmake_commands(REPO_ROOT / "CMakeLists.txt")
    assert commands[0][0] == "cmake_minimum_required"
    assert ("project", ["TCURLoRA"]) in commands
    for field in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert _cmake_set(commands, f"EXTENSION_{field}") != [""], f"EXTENSION_{field} is empty"
    assert _cmake_set(commands, "EXTENSION_CATEGORY") == ["Segmentation"]
    assert _cmake_set(commands, "EXTENSION_DEPENDS") == ["PyTorch"]
    assert _cmake_set(commands, "EXTENSION_ICONURL")[0].endswith("/Resources/TCURLoRA.png")
    homepage = _cmake_set(commands, "EXTENSION_HOMEPAGE")[0]
    raw = homepage.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    for field in ("ICONURL", "SCREENSHOTURLS"):
        for url in _cmake_set(commands, f"EXTENSION_{field}")[0].split():
            assert url.startswith(raw), f"EXTENSION_{field} {url} is not a file of {homepage}"
            assert (REPO_ROOT / url[len(raw):]).is_file(), f"EXTENSION_{field} names {url[len(raw):]}, not in the repository"

    order = [
        ("find_package", ["Slicer", "REQUIRED"]),
        ("include", ["${Slicer_USE_FILE}"]),
        *[("add_subdirectory", [module]) for module in MODULES],
        ("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]),
        ("include", ["${Slicer_EXTENSION_CPACK}"]),
    ]
    positions = [commands.index(command) for command in order]
    assert positions == sorted(positions), "Slicer setup, then the modules, then config and packaging"


def test_cmake_tokenizer_reads_comments_quotes_and_nesting(tmp_path):
    path = tmp_path / "CMakeLists.txt"
    path.write_text('set(A "x # not a comment" ${B}.py) # a comment\nif(NOT (C))\nendif()\n')
    assert _cmake_commands(path) == [
        ("set", ["A", "x # not a comment", "${B}.py"]),
        ("if", ["NOT", "(", "C", ")"]),
        ("endif", []),
    ]
