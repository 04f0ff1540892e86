"""The Colab quickstart (`notebooks/quickstart.ipynb`) executed end to end, as a user's kernel
would run it, in its smoke setting: training, plots, closed-loop evaluation, export and
serving all run, so the notebook cannot rot."""

import os

import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _outputs(cell, kind):
  return [o for o in cell.get("outputs", []) if o.get("output_type") == kind or
          kind in o.get("data", {})]


def test_the_committed_notebook_is_clean_and_linked():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  # Outputs are produced by running it, never committed (they would go stale).
  assert all(not c.outputs and c.execution_count is None for c in code)
  badge = ("https://colab.research.google.com/github/vla-jax/vla_jax/blob/main/"
           "notebooks/quickstart.ipynb")
  assert badge in notebook.cells[0].source
  assert badge in (REPO / "README.md").read_text()


@pytest.mark.slow  # trains two tiny runs, evaluates, exports and serves (about 2 minutes)
def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  # The kernel inherits the environment: smoke settings, outputs and caches in tmp_path.
  monkeypatch.setenv("VLA_JAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("VLA_JAX_NOTEBOOK_RUNS", str(tmp_path / "runs"))
  monkeypatch.setenv("VLA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on failure

  code = [c for c in notebook.cells if c.cell_type == "code"]
  text = "\n".join(o.get("text", "") for c in code for o in _outputs(c, "stream"))
  assert "vla_jax from " + str(REPO) in text
  assert "Align: 4 steps" in text and "SFT: 4 steps" in text
  assert "-> served action" in text
  images = sum(len(_outputs(c, "image/png")) for c in code)
  assert images >= 4, images  # the loss plot, two rollout strips, the served frame
  runs = tmp_path / "runs"
  for run in ("align", "sft"):
    assert (runs / run / "eval_sim" / "results.json").exists()
  assert (runs / "align" / "eval_sim" / "compare.md").exists()
  assert (runs / "align_export").is_dir()
