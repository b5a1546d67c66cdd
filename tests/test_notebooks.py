"""The colabs/ notebooks: committed clean, and executed top to bottom in their tiny setting.

Each notebook has one code cell tagged "parameters" (TINY, WORKDIR, DATA_DIR); the test
rewrites its values, so TINY = True picks a few seconds of training on the CPU, and runs the
notebook headless with nbclient. The notebooks' own asserts (the loss fell, sample shapes,
finite metrics, network-call counts) fail the run when a step is broken.
"""

import ast
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = ("quickstart.ipynb", "samplers.ipynb", "block_diffusion.ipynb", "edlm.ipynb",
             "pretrained.ipynb")
PARAMETERS = ("TINY", "WORKDIR", "DATA_DIR")
KERNEL = "dlm-tests"


def read(name: str):
    return nbformat.read(COLABS / name, as_version=4)


def parameters_cell(notebook):
    cells = [cell for cell in notebook.cells
             if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "expected exactly one cell tagged 'parameters'"
    assert cells[0].cell_type == "code"
    return cells[0]


def set_parameters(cell, **values) -> None:
    """Rewrites the top-level `NAME = ...` assignments of `cell` to `values` (each must exist)."""
    lines = cell.source.splitlines()
    found = set()
    for node in ast.parse(cell.source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id in values):
            name = node.targets[0].id
            comment = lines[node.end_lineno - 1][node.end_col_offset:]
            lines[node.lineno - 1:node.end_lineno] = [f"{name} = {values[name]!r}{comment}"]
            found.add(name)
    missing = sorted(set(values) - found)
    assert not missing, f"the parameters cell does not set {missing}"
    cell.source = "\n".join(lines)


def test_every_notebook_is_tested():
    assert sorted(path.name for path in COLABS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    notebook = read(name)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the outputs"
    defaults = {}
    for node in ast.parse(parameters_cell(notebook).source).body:
        if isinstance(node, ast.Assign):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    assert set(PARAMETERS) <= set(defaults)
    assert defaults["TINY"] is False  # Colab runs the full setting
    assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_set_parameters_rewrites_values_and_keeps_comments():
    cell = nbformat.v4.new_code_cell('# header\nTINY = False  # note\nWORKDIR = "/tmp/x"\nN = 3')
    set_parameters(cell, TINY=True, WORKDIR="/tmp/y")
    assert cell.source == '# header\nTINY = True  # note\nWORKDIR = \'/tmp/y\'\nN = 3'
    with pytest.raises(AssertionError, match="does not set"):
        set_parameters(cell, STEPS=3)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec for this interpreter (the venv's), found first through JUPYTER_PATH, so
    a fresh clone needs no `ipykernel install` and no user kernel named python3 can interfere."""
    prefix = tmp_path_factory.mktemp("kernel")
    kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
    return prefix / "share" / "jupyter"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


# The EDLM notebook trains four runs (about two minutes), and the block diffusion and
# samplers notebooks take some 40 s each: in .ci/run's slow pass (the default run keeps the
# quickstart and pretrained notebooks).
SLOW_NOTEBOOKS = ("edlm.ipynb", "block_diffusion.ipynb", "samplers.ipynb")
RUN = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_NOTEBOOKS else n for n in NOTEBOOKS]


@pytest.mark.parametrize("name", RUN)
def test_tiny_notebook_runs_top_to_bottom(name, tmp_path, kernel_dir, data_dir, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [str(kernel_dir), *filter(None, [os.environ.get("JUPYTER_PATH")])]))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless figures
    notebook = read(name)
    set_parameters(parameters_cell(notebook), TINY=True, WORKDIR=str(tmp_path / "runs"),
                   DATA_DIR=str(data_dir))
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    assert printed.strip() == sys.executable  # the kernel ran this interpreter
    assert (tmp_path / "runs" / "tiny").is_dir()
