"""Static checks of the Slicer side of the extension, run without Slicer.

Slicer cannot run here, so these tests read the module files (Python AST), the Qt Designer .ui files (XML) and the
CMakeLists (a small tokenizer) and check the conventions that Slicer relies on at load, build and packaging time:
class names and bases, widget names, files listed for installation, icons, and lazy engine imports.
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
ENGINE_MODULE = "TCURLoRASegment"  # the module whose folder holds the engine package
ENGINE_PACKAGE = "TCURLoRALib"
# Importing any of these at module load would import torch at Slicer startup, or fail before it is installed.
LAZY_IMPORTS = {"torch", "monai", ENGINE_PACKAGE}
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
    """Names ``X`` of every ``self.ui.X`` in the module."""
    used = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            used.add(node.attr)
    return used


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


@pytest.mark.parametrize("module", MODULES)
def test_engine_and_dependencies_are_not_imported_at_module_load(module):
    tree = _parse_module(module)
    eager = set()
    for node in _import_time_nodes(tree):
        eager |= _imported_top_names(node) & LAZY_IMPORTS
    assert not eager, f"{module}.py imports {sorted(eager)} at load time; import them inside the method that needs them"


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


@pytest.mark.parametrize("module", MODULES)
def test_self_test_runs_every_test_method_without_early_return(module):
    test_class = _top_level_classes(_parse_module(module))[f"{module}Test"]
    methods = _methods(test_class)
    assert "setUp" in methods and "runTest" in methods
    clears = [n for n in ast.walk(methods["setUp"]) if isinstance(n, ast.Call) and _name_of(n.func) == "Clear"]
    assert clears, "setUp must clear the scene"
    called = {_name_of(n.func) for n in ast.walk(methods["runTest"]) if isinstance(n, ast.Call)}
    tests = {name for name in methods if name.startswith("test_")}
    assert tests, f"{module}Test has no test_ method"
    assert tests <= called, f"runTest never calls {sorted(tests - called)}"
    for name in tests | {"runTest"}:
        returns = [n for n in ast.walk(methods[name]) if isinstance(n, ast.Return)]
        assert not returns, f"{module}Test.{name} returns early (line {returns[0].lineno if returns else ''})"


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


def test_every_engine_python_file_is_listed_in_the_segment_module():
    """Slicer installs only listed files: an unlisted engine file is missing from the built extension."""
    _, scripts, _ = _module_cmake(ENGINE_MODULE)
    module_dir = REPO_ROOT / ENGINE_MODULE
    on_disk = {path.relative_to(module_dir).as_posix() for path in (module_dir / ENGINE_PACKAGE).rglob("*.py")}
    assert f"{ENGINE_PACKAGE}/__init__.py" in on_disk
    missing = on_disk - set(scripts)
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS of {ENGINE_MODULE}/CMakeLists.txt: {sorted(missing)}"


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
