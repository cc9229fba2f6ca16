"""Every notebook in notebooks/ runs top to bottom (issue 17, item 5): its code cells, in order, in
a fresh Python process (shell / magic lines such as a Colab ``!pip install`` are skipped), with
a non-interactive matplotlib backend and no persistent compilation cache. A failing cell fails
the test with the notebook's name and the error."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _script(nb_path: pathlib.Path) -> str:
    nb = json.loads(nb_path.read_text())
    parts = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        lines = [ln for ln in src.splitlines() if not ln.lstrip().startswith(("!", "%"))]
        parts.append(f"# --- cell {i}\n" + "\n".join(lines))
    return "\n\n".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(nb, tmp_path):
    from jaxquant import data as jdata

    text = nb.read_text()
    if "wikitext2" in text and jdata.data_dir() is None:
        pytest.skip("set $JAXQUANT_DATA to the protocol data (the notebook reads WikiText-2)")
    if "fashion_mnist" in text and not os.path.isdir(
            os.path.join(jdata.data_dir() or "", "fashion-mnist")):
        pytest.skip("set $JAXQUANT_DATA to the protocol data (the notebook reads Fashion-MNIST)")
    script = tmp_path / f"{nb.stem}.py"
    script.write_text(_script(nb))
    env = {**os.environ, "MPLBACKEND": "Agg", "JAXQUANT_XLA_CACHE": ""}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{nb.name} failed:\n{r.stderr[-3000:]}"


def test_the_numbered_notebooks_exist_each_with_a_colab_install_cell():
    names = [p.stem for p in NOTEBOOKS]
    for prefix in ("01_quickstart", "02_d2quant", "03_kernels", "04_dit", "05_elastic_dllm"):
        assert any(n.startswith(prefix) for n in names), f"notebooks/{prefix}* is missing"
    for nb in NOTEBOOKS:
        code = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        first = "".join(code[0]["source"])
        assert "!pip install" in first and "jaxquant" in first, \
            f"{nb.name}: the first code cell must install jaxquant (Colab)"
        for c in code:  # a notebook stores no outputs: the repository holds code, not results
            assert not c.get("outputs"), f"{nb.name}: a code cell has stored outputs"


def test_notebooks_pass_ruff():
    ruff = pathlib.Path(sys.executable).parent / "ruff"
    if not ruff.is_file():
        pytest.fail("ruff is missing: it comes with the test extra")
    r = subprocess.run([str(ruff), "check", "--no-cache", str(ROOT / "notebooks")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
