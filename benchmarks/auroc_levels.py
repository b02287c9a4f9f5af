"""Where the demo's AUROC is lost, per finding: geometry, encoder or head, from one run on a demo output.

Usage::

    .venv/bin/python benchmarks/auroc_levels.py --demo_dir demo_output [--workers 2] [--n_bootstrap 1000]

Five levels, each a test-split AUROC per finding with a 95% bootstrap CI (same held-out patients for all):

1. **detector, native grid**: the phantom's rule-based detectors (``chest_phantom.qa``) on each test volume
   re-rendered from its ground-truth sidecar (same record, grid, reconstruction and noise seed as the stored
   volume, before quantisation), against the finding-free rendering of the same anatomy. What the image holds.
2. **detector, model-input grid**: the same images, reference and anatomy masks resampled (linear; masks nearest)
   to the model config's input spacing before the detectors run. What resampling to the model's grid keeps.
3. **probe on the encoder's features**: the pretrained image encoder frozen, its global embedding of every
   training volume, one L2-regularised logistic regression per finding (regularisation chosen on validation
   macro AUROC), scored on test. What the pretrained features hold, with labels. With ``--token_probe`` also the
   same probe on all of the encoder's tokens, unpooled (for CTViT ``t * h * w`` tokens instead of their depth
   pooling): what the pooling loses, apart from the encoder (about 6 minutes more at the demo's size).
4. **ClassFine** and 5. **zero-shot**: read from the demo's own test evaluations (``classfine/eval/test`` and
   ``zeroshot/eval/test`` ``metrics.json``).

Reading the table: a finding low at 1 is invisible in the demo's images; a drop from 1 to 2 is geometry; from 2 to 3
the encoder (pretraining); from 3 to 4/5 the head or the prompts. The detectors know the anatomy masks and the
normal reference, which no model has: level 1 is an upper bound on what the pixels hold, not a fair competitor.

Not part of the test suite. Rendering two volumes per test case dominates (about 2–4 s per case per core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = ("detector_native", "detector_model_grid", "probe_tokens", "probe", "classfine", "zeroshot")


def _stem(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def resample_case(img: np.ndarray, reference: np.ndarray, truth: dict, grid: dict, spacing_mm) -> tuple:
    """The image, its normal reference and the anatomy masks on a grid of ``spacing_mm`` (same extent and origin).

    Images are linearly interpolated and masks take the nearest voxel; the returned grid has the exact spacing of the
    zoom (corner-aligned), which is within a voxel fraction of ``spacing_mm``.
    """
    from scipy import ndimage

    shape = np.asarray(grid["shape"], float)
    sp = np.asarray(grid["spacing_mm"], float)
    new_shape = np.maximum(np.round((shape - 1) * sp / np.asarray(spacing_mm, float)).astype(int) + 1, 2)
    zoom = (new_shape - 1) / (shape - 1)

    def image(a):
        return ndimage.zoom(np.asarray(a, np.float32), zoom, order=1, grid_mode=False)

    def mask(a):
        a = np.asarray(a)
        out = ndimage.zoom(a.astype(np.uint8), zoom, order=0, grid_mode=False)
        return out.astype(bool) if a.dtype == bool else out.astype(a.dtype)

    masks = {k: (mask(v) if isinstance(v, np.ndarray) and v.shape == img.shape else v) for k, v in truth["masks"].items()}
    new_grid = {"shape": [int(v) for v in new_shape], "spacing_mm": [float(v) for v in (shape - 1) * sp / (new_shape - 1)],
                "origin_mm": [float(v) for v in grid["origin_mm"]]}
    return image(img), image(reference), dict(truth, masks=masks), new_grid


def detector_case(task: tuple) -> tuple[dict, dict]:
    """Detector scores of one ground-truth sidecar at the native grid and at the model-input spacing."""
    sidecar_path, spacing_mm = task
    from chest_phantom.qa import detector_scores, normal_reference
    from chest_phantom.render import render_truth
    from chest_phantom.scanner import apply_scanner

    gt = json.loads(Path(sidecar_path).read_text())
    record, grid, recon, seed = gt["record"], gt["grid"], gt["recon"], int(gt["seeds"]["scanner"])
    truth = render_truth(record, grid)
    img = apply_scanner(truth, grid, recon, seed=seed)
    reference = normal_reference(record, grid, recon, seed)
    native = detector_scores(img, truth, grid, reference)
    img_c, reference_c, truth_c, grid_c = resample_case(img, reference, truth, grid, spacing_mm)
    coarse = detector_scores(img_c, truth_c, grid_c, reference_c)
    return native, coarse


def detector_levels(items: list[dict], cohort: Path, spacing_mm, workers: int) -> tuple[np.ndarray, np.ndarray]:
    from ctclip_contract import CTRATE_PATHOLOGIES

    tasks = []
    for item in items:
        sidecar = cohort / "ground_truth" / f"{_stem(item['name'])}.json"
        if not sidecar.exists():
            raise FileNotFoundError(f"{sidecar}: no ground-truth sidecar for test volume {item['name']!r}")
        tasks.append((str(sidecar), list(spacing_mm)))
    native, coarse = [], []
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, (a, b) in enumerate(pool.map(detector_case, tasks), start=1):
            native.append([a[p] for p in CTRATE_PATHOLOGIES])
            coarse.append([b[p] for p in CTRATE_PATHOLOGIES])
            if i % 10 == 0 or i == len(tasks):
                print(f"  detectors: {i}/{len(tasks)} cases, {time.perf_counter() - start:.0f} s", flush=True)
    return np.asarray(native), np.asarray(coarse)


def encoder_features(model, items: list[dict], model_config, tokens: bool = False) -> dict[str, np.ndarray]:
    """The frozen encoder's global embedding (before the latent projection) of each preprocessed volume,
    ``{"embedding": (N, dim_image)}``, and with ``tokens`` all its tokens flattened, ``"tokens"``."""
    import torch
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from transforms import CTVolumeReader, ToModelInputd

    load = Compose([LoadImaged("image", reader=CTVolumeReader(), dtype=None), EnsureChannelFirstd("image"),
                    ToModelInputd.from_model_config("image", model_config)])
    out: dict[str, list] = {"embedding": [], **({"tokens": []} if tokens else {})}
    with torch.inference_mode():
        for item in items:
            x = torch.as_tensor(load({"image": item["image"]})["image"]).float()[None]
            encoding = model.image_encoding(x)
            out["embedding"].append(encoding.embedding.flatten(1)[0].numpy())
            if tokens:
                out["tokens"].append(encoding.tokens.flatten(1)[0].numpy())
    return {k: np.stack(v) for k, v in out.items()}


def probe_scores(xtr, ytr, xva, yva, xte, c_grid=(1e-3, 1e-2, 1e-1, 1.0)) -> tuple[np.ndarray, float]:
    """Per-finding logistic regression on standardised features; C picked by validation macro AUROC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from workflows.metrics import macro_auroc

    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)

    def fit_predict(c, xs):
        cols = []
        for k in range(ytr.shape[1]):
            if len(np.unique(ytr[:, k])) < 2:
                cols.append([np.full(len(x), float(ytr[0, k])) for x in xs])
                continue
            clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr[:, k])
            cols.append([clf.decision_function(x) for x in xs])
        return [np.stack([col[i] for col in cols], axis=1) for i in range(len(xs))]

    best = max(c_grid, key=lambda c: macro_auroc(yva, fit_predict(c, [xva])[0])[0])
    return fit_predict(best, [xte])[0], best


def auroc_block(labels, scores, n_bootstrap: int) -> dict:
    from ctclip_contract import CTRATE_PATHOLOGIES
    from workflows.metrics import bootstrap_auroc

    return bootstrap_auroc(labels, scores, n_bootstrap=n_bootstrap, seed=0, class_names=CTRATE_PATHOLOGIES)


def from_metrics(path: Path) -> dict:
    """The per-class and macro AUROC with CI of a demo evaluation, in the shape of :func:`auroc_block`."""
    m = json.loads(path.read_text())["auroc"]
    return {"per_class": {k: {"auroc": v["auroc"], "ci_low": v["ci_low"], "ci_high": v["ci_high"]}
                          for k, v in m["per_class"].items()},
            "macro": {"auroc": m["macro"], "ci_low": m["macro_ci_low"], "ci_high": m["macro_ci_high"]}}


def _cell(b: dict | None) -> str:
    if b is None or b.get("auroc") is None:
        return "—"
    lo, hi = b.get("ci_low"), b.get("ci_high")
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi) else ""
    return f"{b['auroc']:.3f}{ci}"


def markdown_table(blocks: dict[str, dict]) -> str:
    from ctclip_contract import CTRATE_PATHOLOGIES

    heads = {"detector_native": "detector, native grid", "detector_model_grid": "detector, model-input grid",
             "probe_tokens": "probe on all encoder tokens", "probe": "probe on encoder features",
             "classfine": "ClassFine", "zeroshot": "zero-shot"}
    cols = [k for k in LEVELS if k in blocks]
    lines = ["| finding | " + " | ".join(heads[k] for k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in CTRATE_PATHOLOGIES:
        lines.append(f"| {name} | " + " | ".join(_cell(blocks[k]["per_class"].get(name)) for k in cols) + " |")
    lines.append("| **macro** | " + " | ".join(f"**{_cell(blocks[k]['macro'])}**" for k in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo_dir", default="demo_output", help="a finished `make demo` output folder")
    p.add_argument("--model_config", default="ctclip_small")
    p.add_argument("--split", default="test")
    p.add_argument("--workers", type=int, default=2, help="processes rendering the detector levels")
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--max_cases", type=int, default=None, help="first N evaluated volumes only (a smoke run)")
    p.add_argument("--skip_detectors", action="store_true")
    p.add_argument("--token_probe", action="store_true", help="also probe all encoder tokens, unpooled")
    p.add_argument("--output", default=None, help="JSON of every level (default: DEMO_DIR/auroc_levels.json)")
    args = p.parse_args(argv)

    import torch

    import custom_nets
    from ctclip_contract import load_model_config
    from transforms import load_datalist

    demo = Path(args.demo_dir)
    pre, cohort = demo / "preprocessed", demo / "cohort"
    cfg = load_model_config(args.model_config)
    test = load_datalist(pre, args.split, require_labels=True, max_items=args.max_cases)
    y_test = np.asarray([it["label"] for it in test], float)
    blocks: dict[str, dict] = {}
    timings: dict[str, float] = {}
    print(f"{len(test)} {args.split} volumes from {pre}; load average {os.getloadavg()[0]:.1f}", flush=True)

    if not args.skip_detectors:
        t = time.perf_counter()
        native, coarse = detector_levels(test, cohort, cfg.input.spacing_mm, args.workers)
        blocks["detector_native"] = auroc_block(y_test, native, args.n_bootstrap)
        blocks["detector_model_grid"] = auroc_block(y_test, coarse, args.n_bootstrap)
        timings["detectors_s"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    model = custom_nets.create_model(cfg, checkpoint=str(demo / "pretrain" / "models" / "model.pt")).eval()
    train = load_datalist(pre, "training", require_labels=True)
    val = load_datalist(pre, "validation", require_labels=True)
    feats = {k: encoder_features(model, v, cfg, tokens=args.token_probe)
             for k, v in (("training", train), ("validation", val), ("test", test))}
    y_train, y_val = (np.asarray([i["label"] for i in items]) for items in (train, val))
    for level, kind in (("probe", "embedding"), ("probe_tokens", "tokens")):
        if kind not in feats["training"]:
            continue
        scores, c = probe_scores(feats["training"][kind], y_train, feats["validation"][kind], y_val,
                                 feats["test"][kind])
        blocks[level] = auroc_block(y_test, scores, args.n_bootstrap)
        timings[f"{level}_s"] = time.perf_counter() - t
        print(f"  {level}: {feats['training'][kind].shape[1]}-d features, C={c}, {timings[f'{level}_s']:.0f} s",
              flush=True)
        t = time.perf_counter()

    for level, sub in (("classfine", "classfine"), ("zeroshot", "zeroshot")):
        path = demo / sub / "eval" / args.split / "metrics.json"
        if path.exists() and args.max_cases is None:
            blocks[level] = from_metrics(path)
        else:
            print(f"  {level}: {path} not read ({'missing' if not path.exists() else 'a --max_cases run'})")

    table = markdown_table(blocks)
    print(table)
    out = {"demo_dir": str(demo), "split": args.split, "n_cases": len(test), "levels": blocks, "timings": timings,
           "load_average": os.getloadavg()[0], "markdown": table}
    from workflows.metrics import to_jsonable
    from ctclip_contract.files import atomic_write_json

    atomic_write_json(Path(args.output) if args.output else demo / "auroc_levels.json", to_jsonable(out), indent=1)
    return out


if __name__ == "__main__":
    main()
