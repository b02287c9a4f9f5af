"""The files behind the handlers: atomic writers, per-class tables, predictions CSV, PNG plots."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from transforms import CTRATE_PATHOLOGIES
from workflows.metrics import evaluate_classification
from workflows.writers import (
    atomic_write_text,
    per_class_rows,
    read_predictions_csv,
    write_csv_rows,
    write_json,
    write_per_class_tables,
    write_predictions_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cohort(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 18)) < 0.3).astype(int)
    y[:, 3] = 0  # one class without positives
    s = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 1.5 * y)))
    return y, s


def test_atomic_write_keeps_old_content_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"a": float("nan"), "b": np.float32(0.5), "c": np.arange(2)})
    assert json.loads(target.read_text()) == {"a": None, "b": 0.5, "c": [0, 1]}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "half a file")
    assert json.loads(target.read_text())["b"] == 0.5  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # temp file removed


def test_predictions_csv_columns_decisions_and_roundtrip(tmp_path):
    y, s = _cohort(n=5)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(5)]
    thr = np.full(18, 0.5)
    thr[2] = np.nan
    path = write_predictions_csv(tmp_path / "p.csv", names, s, thresholds={"vlm3d": thr}, labels=y)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    assert header[:19] == ["VolumeName", *CTRATE_PATHOLOGIES]
    assert header[19] == f"{CTRATE_PATHOLOGIES[0]}_pred_vlm3d" and header[-1] == f"{CTRATE_PATHOLOGIES[-1]}_label"
    assert len(header) == 1 + 3 * 18 and len(rows) == 6
    first = dict(zip(header, rows[1]))
    assert first[f"{CTRATE_PATHOLOGIES[2]}_pred_vlm3d"] == ""  # no threshold -> no decision
    assert first[f"{CTRATE_PATHOLOGIES[0]}_pred_vlm3d"] == str(int(s[0, 0] >= 0.5))
    got_names, got_p, got_y = read_predictions_csv(path, with_labels=True)
    assert got_names == names
    np.testing.assert_allclose(got_p, s, atol=1e-6)
    np.testing.assert_array_equal(got_y, y)
    with pytest.raises(ValueError, match="probabilities must be"):
        write_predictions_csv(tmp_path / "bad.csv", names[:4], s)
    with pytest.raises(KeyError, match="_label"):
        write_predictions_csv(tmp_path / "nolab.csv", names, s)
        read_predictions_csv(tmp_path / "nolab.csv", with_labels=True)


def test_per_class_tables_csv_and_markdown(tmp_path):
    y, s = _cohort()
    yv, sv = _cohort(seed=1)
    res = evaluate_classification(y, s, val_labels=yv, val_scores=sv, n_bootstrap=50)
    rows = per_class_rows(res)
    assert [r["class"] for r in rows] == [*CTRATE_PATHOLOGIES, "macro"]
    assert rows[-1]["auroc"] == res["auroc"]["macro"]
    assert rows[0]["vlm3d_threshold"] == 0.5
    paths = write_per_class_tables(res, tmp_path)
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 19 and table[3]["auroc"] == ""  # Pericardial effusion: undefined -> empty cell
    assert float(table[0]["auroc"]) == pytest.approx(res["auroc"]["per_class"][CTRATE_PATHOLOGIES[0]]["auroc"])
    md = paths["md"].read_text()
    assert "## Protocol `ctclip_paper` (optimistic)" in md and "## Protocol `val_youden`" in md
    assert "| Pericardial effusion | 0 | n/a | n/a |" in md
    assert "Pericardial effusion: excluded from the macro AUROC" in md


def test_write_csv_rows_union_of_keys(tmp_path):
    p = write_csv_rows(tmp_path / "r.csv", [{"epoch": 1, "a": 0.5}, {"epoch": 2, "b": float("nan")}])
    assert p.read_text().splitlines() == ["epoch,a,b", "1,0.5,", "2,,"]


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_plots_write_pngs(tmp_path):
    from workflows.plots import embed_2d, plot_latent_map, plot_learning_curve, plot_roc_curves

    y, s = _cohort(n=40)
    assert _is_png(plot_roc_curves(y[:, :4], s[:, :4], tmp_path / "roc.png", list("abcd")))
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(40, 8))
    assert _is_png(plot_latent_map(lat, y, tmp_path / "map.png", method="pca"))
    write_csv_rows(tmp_path / "m.csv", [{"epoch": e, "macro_auroc": 0.5 + 0.1 * e} for e in (1, 2, 3)])
    assert _is_png(plot_learning_curve(tmp_path / "m.csv", tmp_path / "lc.png"))
    # PCA: coordinates are the top-2 principal components (variance in decreasing order)
    xy, method = embed_2d(lat * np.array([5, 3, 1, 1, 1, 1, 1, 1]), method="pca")
    assert method == "pca" and xy.shape == (40, 2) and xy[:, 0].var() >= xy[:, 1].var()
    assert not list(tmp_path.glob(".*tmp*"))


def test_latent_map_falls_back_to_pca_without_scikit_learn(monkeypatch):
    from workflows.plots import embed_2d

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    xy, method = embed_2d(np.random.default_rng(0).normal(size=(30, 5)), method="auto")
    assert method == "pca" and xy.shape == (30, 2)


def test_core_imports_without_matplotlib():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import numpy as np, workflows, workflows.plots\n"
        "r = workflows.evaluate_classification(np.eye(4, 2), np.eye(4, 2), ['a', 'b'], n_bootstrap=10)\n"
        "assert r['auroc']['macro'] == 1.0\n"
        "try:\n    workflows.plots.plot_roc_curves(np.eye(4, 2), np.eye(4, 2), 'x.png')\n"
        "except ImportError:\n    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"
