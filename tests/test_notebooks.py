"""Notebooks: built from notebooks/build.py, valid, their code compiles, and the quickstart runs
top to bottom on CPU (headless, with nbclient) in a temporary working directory."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ["01_quickstart.ipynb", "02_glue_finetune.ipynb", "03_attention_kernel.ipynb"]


def _require(module):
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed; it is in the test extra: pip install -e '.[test]'")
    return importlib.import_module(module)


def _load_builder():
    spec = importlib.util.spec_from_file_location("notebook_build",
                                                  os.path.join(NOTEBOOKS, "build.py"))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


def test_committed_notebooks_match_build_py():
    _require("nbformat")
    builder = _load_builder()
    assert sorted(builder.NOTEBOOKS) == NAMES
    assert builder.main(["--check"]) == 0, "run: python notebooks/build.py"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_and_its_code_compiles(name):
    nbformat = _require("nbformat")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(notebook)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells and all(not c.outputs for c in code_cells), "commit notebooks unexecuted"
    for index, cell in enumerate(code_cells):
        # Shell escapes and magics are IPython, not Python: blank them out, keep line numbers.
        source = "\n".join("" if line.lstrip().startswith(("!", "%")) else line
                           for line in cell.source.splitlines())
        compile(source, f"{name} code cell {index}", "exec")
    # Each notebook works from a checkout (CI) and from Colab (clones and installs itself).
    assert "import mosaicbert_jax" in code_cells[0].source
    assert "pip" in code_cells[0].source


def test_quickstart_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the quickstart compares with PyTorch: pip install -e '.[torch]'")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(os.path.join(NOTEBOOKS, "01_quickstart.ipynb"), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    def text_of(cell):
        return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                       for o in cell.outputs)

    outputs = "\n".join(text_of(c) for c in notebook.cells if c.cell_type == "code")
    assert "summary: steps=60" in outputs
    assert "tokenizer.json" in outputs and "checkpoints" in outputs
    assert outputs.count("top-1 filled:") == 2  # the fill-mask command, one text per line
    assert re.search(r"\[MASK\] 2: \S+ 0\.\d{3}", outputs)  # the Python fill_mask
    assert "model.safetensors" in outputs
    match = re.search(r"max \|JAX - PyTorch\| = (\S+), same top-1 token at 100%", outputs)
    assert match and float(match.group(1)) < 1e-3, outputs[-2000:]
    assert os.path.isdir(tmp_path / "mosaicbert-tiny" / "checkpoints" / "60")
