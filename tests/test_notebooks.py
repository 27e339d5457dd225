"""Notebooks: built from notebooks/build.py, valid, their code compiles, the setup cell explains
how to install the package where it is missing, and all three run top to bottom on CPU
(headless, with nbclient) in a temporary working directory, offline, at the small sizes of
MOSAICBERT_NOTEBOOK_SMALL=1 (about a minute each on 2 cores)."""

import importlib.util
import os
import re
import subprocess
import sys

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


def _setup_source(name="01_quickstart.ipynb"):
    nbformat = _require("nbformat")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    return next(c for c in notebook.cells if c.cell_type == "code").source


def test_no_placeholder_repository_url():
    for name in NAMES:
        assert "OWNER" not in open(os.path.join(NOTEBOOKS, name)).read(), name


def test_setup_cell_without_the_package_says_how_to_install_it(tmp_path):
    """Run in a Python that cannot import mosaicbert_jax (-S: no site-packages, no PYTHONPATH)."""
    source = _setup_source()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOSAICBERT_SOURCE")}

    def run(**extra):
        return subprocess.run([sys.executable, "-S", "-c", source], capture_output=True,
                              text=True, cwd=tmp_path, env={**env, **extra}, timeout=60)

    missing = run()
    assert missing.returncode == 1
    assert "RuntimeError: mosaicbert-jax is not installed in this runtime. Set " \
           "MOSAICBERT_SOURCE at the top of this cell to a git URL" in missing.stderr
    wrong = run(MOSAICBERT_SOURCE=str(tmp_path / "nowhere"))
    assert wrong.returncode == 1 and "is not a git URL, a mosaicbert-jax checkout" in wrong.stderr
    assert not os.listdir(tmp_path), "nothing cloned or installed"


def _execute(name, tmp_path, monkeypatch):
    """Runs a notebook top to bottom (small sizes, CPU); returns the text of all outputs."""
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MOSAICBERT_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    def text_of(cell):
        return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                       for o in cell.outputs)

    return notebook, "\n".join(text_of(c) for c in notebook.cells if c.cell_type == "code")


def test_quickstart_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the quickstart compares with PyTorch: pip install -e '.[torch]'")
    _, outputs = _execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    assert "(small sizes)" in outputs
    assert "summary: steps=20" in outputs
    assert "tokenizer.json" in outputs and "checkpoints" in outputs
    assert outputs.count("top-1 filled:") == 2  # the fill-mask command, one text per line
    assert re.search(r"\[MASK\] 2: \S+ 0\.\d{3}", outputs)  # the Python fill_mask
    assert "model.safetensors" in outputs
    match = re.search(r"max \|JAX - PyTorch\| = (\S+), same top-1 token at 100%", outputs)
    assert match and float(match.group(1)) < 1e-3, outputs[-2000:]
    assert os.path.isdir(tmp_path / "mosaicbert-tiny" / "checkpoints" / "20")


def test_glue_notebook_runs_offline_on_the_shipped_sample(tmp_path, monkeypatch):
    _, outputs = _execute("02_glue_finetune.ipynb", tmp_path, monkeypatch)
    assert "no GLUE_DIR: using the synthetic SST-2-format sample" in outputs
    assert "120 dev sentences" in outputs
    results = tmp_path / "glue-sst2" / "glue_results.json"
    import json

    accuracy = json.loads(results.read_text())["tasks"]["sst2"]["metrics"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert len(re.findall(r"^\s*(positive|negative) \((right|wrong)\)", outputs, re.M)) == 8


def test_attention_notebook_runs_and_plots(tmp_path, monkeypatch):
    notebook, outputs = _execute("03_attention_kernel.ipynb", tmp_path, monkeypatch)
    images = sum("image/png" in o.get("data", {}) for c in notebook.cells
                 if c.cell_type == "code" for o in c.outputs)
    assert images == 3, "the bias heat maps, the tile plot and the timing plot"
    error = float(re.search(r"max \|xla - formula\| = (\S+)", outputs).group(1))
    assert error < 1e-5
    assert "padding rows are zero: True" in outputs
    assert re.search(r"pallas_interpret: loss [\d.]+ vs [\d.]+; max \|dq, dk, dv", outputs)
    assert re.search(r"^256 \{'xla': '[\d.]+ ms'\}", outputs, re.M)
