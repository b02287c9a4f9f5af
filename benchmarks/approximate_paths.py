"""How far an approximate inference path (bf16 on CPU) moves the zero-shot results, on a preprocessed test split.

Usage::

    .venv/bin/python benchmarks/approximate_paths.py --demo-output demo_output            # the demo's test split
    .venv/bin/python benchmarks/approximate_paths.py --dataset-dir DIR [--pretrained model.pt]
        [--model-config ctclip_small] [--split test] [--variants bf16] [--n-bootstrap 1000] [--out DIR]

Runs the ``ct_clip_zeroshot`` bundle's ``inference.json`` on the split once on the exact path and once per
variant, the variant being nothing but a model-config override passed as the bundle's ``--model_overrides``
(``bf16``: ``{"ctclip": {"autocast_dtype": "bfloat16"}}``: both encoders under bfloat16 autocast). From the two
``predictions.csv`` and the split's labels it prints, per variant: the largest absolute probability difference,
the macro AUROC of both paths and the change with its 95% paired bootstrap interval (the same resampled cases for
both paths), and the wall time of each run. ``--demo-output`` reads ``<dir>/preprocessed`` and the pretrained
``<dir>/pretrain/models/model.pt`` of a ``make demo`` run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from memory import machine_state

VARIANTS = {"bf16": {"ctclip": {"autocast_dtype": "bfloat16"}}}
REPO = Path(__file__).resolve().parents[1]


def run_inference(out: Path, dataset_dir: str, model_config: str, pretrained: str | None, split: str,
                  overrides: dict) -> float:
    """One ``inference.json`` run writing ``out/predictions.csv``; returns its wall seconds."""
    from workflows.demo import Stage

    options = {"dataset_dir": dataset_dir, "split": split, "model_config": model_config, "output_dir": str(out),
               "model_overrides": overrides, "pretrained": pretrained or ""}
    stage = Stage("zeroshot", "bundles/ct_clip_zeroshot", ["inference.json"], options, "zero-shot inference")
    t0 = time.perf_counter()
    proc = subprocess.run(stage.command(), cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode or not (out / "predictions.csv").exists():
        sys.exit(f"zero-shot inference failed (exit {proc.returncode}): {stage.shell_command()}\n{proc.stderr[-3000:]}")
    return seconds


def paired_macro_change(labels: np.ndarray, exact: np.ndarray, approx: np.ndarray, n_bootstrap: int = 1000,
                        seed: int = 0, ci: float = 0.95) -> dict:
    """Macro AUROC of both score sets and the change ``approx - exact`` with a percentile interval over case
    resamples shared by both (resamples where a class has one label value are skipped)."""
    from workflows.metrics import macro_auroc, percentile_ci

    def macro(y, s):
        with np.errstate(all="ignore"):
            value, _ = macro_auroc(y, s)
        return value

    base, new = macro(labels, exact), macro(labels, approx)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(labels), len(labels))
        y = labels[idx]
        if ((y.min(0) == y.max(0)) & (labels.min(0) != labels.max(0))).any():
            continue  # a class that counts in the full data has one label value here
        deltas.append(macro(y, approx[idx]) - macro(y, exact[idx]))
    low, high = percentile_ci(np.asarray(deltas, dtype=float), ci)
    return {"macro_exact": base, "macro_approx": new, "change": new - base, "ci_low": float(low),
            "ci_high": float(high), "n_valid": len(deltas)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-output", help="a make-demo output folder (preprocessed/ and pretrain/models/model.pt)")
    parser.add_argument("--dataset-dir", help="a ct_preprocess output folder (datalist.json, volumes/)")
    parser.add_argument("--pretrained", help="weights; none: random (a smoke run)")
    parser.add_argument("--model-config", default="ctclip_small")
    parser.add_argument("--split", default="test")
    parser.add_argument("--variants", nargs="+", default=["bf16"], choices=sorted(VARIANTS))
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--out", default=None, help="where the runs go (default: DEMO_OUTPUT/approximate_paths, or a "
                        "new temporary folder): never the working directory, which may be the repository")
    args = parser.parse_args(argv)
    if args.demo_output:
        args.dataset_dir = args.dataset_dir or os.path.join(args.demo_output, "preprocessed")
        args.pretrained = args.pretrained or os.path.join(args.demo_output, "pretrain", "models", "model.pt")
    if not args.dataset_dir:
        parser.error("give --demo-output or --dataset-dir")
    if args.out is None:
        args.out = (os.path.join(args.demo_output, "approximate_paths") if args.demo_output
                    else tempfile.mkdtemp(prefix="approximate_paths_"))

    from transforms.discovery import load_datalist
    from workflows.writers import read_predictions_csv

    out = Path(args.out)
    runs = {}
    for name, overrides in [("exact", {})] + [(v, VARIANTS[v]) for v in args.variants]:
        seconds = run_inference(out / name, args.dataset_dir, args.model_config, args.pretrained, args.split, overrides)
        names, probs = read_predictions_csv(out / name / "predictions.csv")
        runs[name] = {"seconds": seconds, "names": names, "probs": probs}
        print(f"{name}: {len(names)} volumes in {seconds:.1f} s (bundle run, start-up included); {machine_state()}",
              flush=True)
    items = {it["name"]: it for it in load_datalist(args.dataset_dir, args.split, require_labels=True)}
    exact = runs["exact"]
    labels = np.asarray([items[n]["label"] for n in exact["names"]], dtype=np.float64)
    results = {}
    for name in args.variants:
        run = runs[name]
        if run["names"] != exact["names"]:
            sys.exit(f"{name}: predictions.csv lists other volumes than the exact run's")
        change = paired_macro_change(labels, exact["probs"], run["probs"], args.n_bootstrap)
        results[name] = {"max_abs_prob_diff": float(np.abs(run["probs"] - exact["probs"]).max()),
                         "seconds": run["seconds"], "exact_seconds": exact["seconds"], **change}
        r = results[name]
        print(f"{name} vs exact on {len(labels)} {args.split} volumes: max |dP| {r['max_abs_prob_diff']:.2e}; macro "
              f"AUROC {r['macro_exact']:.4f} -> {r['macro_approx']:.4f}, change {r['change']:+.4f} "
              f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] (95% paired bootstrap, {r['n_valid']} resamples); run "
              f"{r['exact_seconds']:.1f} s -> {r['seconds']:.1f} s ({r['exact_seconds'] / r['seconds']:.2f}x)")
    (out / "approximate_paths.json").write_text(json.dumps(results, indent=1))
    print(machine_state())
    return 0


if __name__ == "__main__":
    sys.exit(main())
