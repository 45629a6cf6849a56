"""The layout shows the layers: ``pipellm/_ext`` holds the low-level mechanisms, and
nothing in it imports a part above it (channel, devices, pipeline, predictors, ...)."""

import pathlib
import re

import pipellm

EXT = pathlib.Path(pipellm.__file__).parent / "_ext"
ALLOWED = ("pipellm._ext", "pipellm.errors")
# import / cimport statements naming a pipellm module, absolute or relative
IMPORT = re.compile(r"^\s*(?:from\s+(\S+)\s+c?import|c?import\s+(\S+))", re.M)


def imports_of(path: pathlib.Path) -> list[str]:
    names = []
    for m in IMPORT.finditer(path.read_text()):
        name = m.group(1) or m.group(2)
        if name.startswith(".."):
            name = "pipellm." + name[2:]
        elif name.startswith("."):
            name = "pipellm._ext." + name[1:]
        if name.startswith("pipellm"):
            names.append(name)
    return names


def test_nothing_in_ext_imports_a_higher_layer():
    sources = sorted(p for p in EXT.iterdir() if p.suffix in (".py", ".pyx", ".pxd"))
    assert len(sources) >= 10
    upward = {p.name: [n for n in imports_of(p) if not n.startswith(ALLOWED)] for p in sources}
    assert not {k: v for k, v in upward.items() if v}


def test_the_checker_sees_upward_imports(tmp_path):
    """(The check above can fail: an upward import, absolute or relative, is found.)"""
    source = tmp_path / "x.pyx"
    source.write_text("from pipellm.pipeline.region import Region\nfrom ..channel import Kind\n"
                      "from pipellm._ext.locks cimport Lock\n    from pipellm import timeline\n")
    assert imports_of(source) == ["pipellm.pipeline.region", "pipellm.channel", "pipellm._ext.locks", "pipellm"]


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def test_the_extensions_stubs_name_what_the_compiled_modules_have():
    """Each ``.pyi`` beside a compiled mechanism (what type checkers and editors read)
    names exactly the module's public classes, functions and constants, and each class's
    public members."""
    import ast
    import importlib
    stubs = sorted(EXT.glob("*.pyi"))
    assert {p.stem for p in stubs} >= {"bounce", "fence", "locks", "memcopy", "writeguard"}
    for stub in stubs:
        module = importlib.import_module(f"pipellm._ext.{stub.stem}")
        tree = ast.parse(stub.read_text())
        declared = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                declared[node.name] = _public(n.name if isinstance(n, ast.FunctionDef) else n.target.id
                                              for n in node.body if isinstance(n, (ast.FunctionDef, ast.AnnAssign)))
            elif isinstance(node, ast.FunctionDef):
                declared[node.name] = None
            elif isinstance(node, ast.AnnAssign):
                declared[node.target.id] = None
        real = {n for n in _public(vars(module)) if getattr(getattr(module, n), "__module__", module.__name__)
                == module.__name__ and not isinstance(getattr(module, n), type(module))}
        assert _public(declared) == real, stub.name
        for name, members in declared.items():
            if members is not None and not name.startswith("_"):
                assert members == _public(vars(getattr(module, name))), f"{stub.name}: {name}"
