"""The documented layer order (README, Architecture): each dlm package imports only the
packages below it. Checked twice: statically over every import statement of every module
(function-level imports included), and at run time by importing each package in a fresh
interpreter and listing the dlm modules it loaded."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

# Bottom to top; a package may import itself and any package of a lower row, nothing else.
LAYERS = [
    ("dlm.registry",),
    ("dlm.data", "dlm.models"),
    ("dlm.diffusion",),
    ("dlm.sampling",),
    ("dlm.parallel",),
    ("dlm.evaluation",),
    ("dlm.runs",),
    ("dlm.training",),
    ("dlm.export",),
]
PACKAGES = [name for row in LAYERS for name in row]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _layer(module: str) -> tuple[int, str] | None:
    """(row, package) of a dlm module, or None for modules outside the layers (dlm itself)."""
    for row, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return row, name
    return None


def _allowed(importer: str, imported: str) -> bool:
    mine, theirs = _layer(importer), _layer(imported)
    if mine is None or theirs is None:
        return True
    return theirs[1] == mine[1] or theirs[0] < mine[0]


def _imports(path: pathlib.Path, module: str) -> list[str]:
    """Every dlm module named by an import statement anywhere in the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.rsplit(".", node.level)[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.append(target)
            names += [f"{target}.{alias.name}" for alias in node.names]
    return [n for n in names if n == "dlm" or n.startswith("dlm.")]


def test_every_package_is_in_a_layer():
    found = {p.name for p in (ROOT / "dlm").iterdir()
             if p.is_dir() and (p / "__init__.py").exists()}
    found |= {p.stem for p in (ROOT / "dlm").glob("*.py") if p.stem != "__init__"}
    assert {f"dlm.{name}" for name in found} == set(PACKAGES)


def test_no_module_imports_upward():
    upward = []
    for path in sorted((ROOT / "dlm").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for name in _imports(path, module):
            # `from dlm.x import y` names both dlm.x and dlm.x.y; judge the package.
            if _layer(name) is not None and not _allowed(module, name):
                upward.append(f"{module} imports {name}")
    assert not upward, "\n".join(sorted(set(upward)))


def test_the_check_sees_an_upward_import():
    assert not _allowed("dlm.sampling.engine", "dlm.training.trainer")
    assert not _allowed("dlm.data.pipeline", "dlm.models.registry")  # same row, other package
    assert _allowed("dlm.training.trainer", "dlm.sampling.engine")


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_a_package_loads_only_lower_layers(package):
    code = ("import json, sys; import " + package + "; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('dlm.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=300)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    upward = [m for m in loaded if not _allowed(package, m)]
    assert not upward, f"importing {package} loaded {upward}"
