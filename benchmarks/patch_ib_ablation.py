"""Patch-IB ablation: the presets A-E pretrained on one preprocessed cohort and evaluated on its test split, one table.

A global CLIP; B + local alignment; C + the salience mask (L_sparse, L_cons); D + soft top-K; E + hard token drop
(``bundles/ct_clip_pretrain/configs/patch_ib_<A..E>.json``, docs/patch_ib.md). Each preset is pretrained by the
pretraining bundle (``python -m monai.bundle run``, the command a user types) into ``<output_dir>/<preset>``, and its
best model (``models/model.pt`` and ``models/heads.pt``) is evaluated here on the test split:

- zero-shot macro AUROC (the model config's prompts and scoring) with a percentile bootstrap CI over volumes;
- report -> volume recall@1/5/10 over the test volumes, bootstrap CI over the report queries (gallery fixed);
- the mean kept-token ratio (1 without a mask; the mean mask, or the mean soft top-K gate; K / N for the hard drop);
- the inference time per volume (image encoder and Patch-IB head, batch 1, after one warm-up volume).

The image latent of A and B is the global one (``to_visual_latent``); of C-E the masked one, the salience-weighted
pool of the kept tokens: the embedding a Patch-IB model serves. For E the time of the same model with every token
(no drop) is printed too: that ratio is the speed-up of the drop.

Run on the demo cohort (``make demo`` first): ``python benchmarks/patch_ib_ablation.py --dataset_dir
demo_output/preprocessed --output_dir demo_output/patch_ib --epochs 8``. A smoke run:
``--model_config ctclip_tiny --dataset_dir <tiny preprocessed> --epochs 1 --max_items 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_clip_pretrain"
PRESETS = {"A": "global", "B": "+ local", "C": "+ Patch-IB", "D": "+ soft top-K", "E": "+ hard drop"}
KS = (1, 5, 10)


def _dataset_dir(path: Path) -> Path:
    # the demo's output folder holds the preprocessed cohort in preprocessed/
    if (path / "datalist.json").exists():
        return path
    if (path / "preprocessed" / "datalist.json").exists():
        return path / "preprocessed"
    raise SystemExit(f"{path}: no datalist.json (a ct_preprocess output folder or the demo's output folder)")


def _config_files(preset: str) -> list[str]:
    return [str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / f"patch_ib_{preset}.json")]


def _overrides(args, dataset_dir: Path, out: Path) -> dict:
    o = {"dataset_dir": str(dataset_dir), "output_dir": str(out), "model_config": args.model_config,
         "epochs": args.epochs, "num_workers": args.num_workers, "progress": False, "seed": args.seed,
         "resume": False}
    if args.batch_size:
        o["batch_size"] = args.batch_size
    if args.max_items:
        o.update(max_train_items=args.max_items, max_val_items=args.max_items)
    return o


def pretrain(preset: str, args, dataset_dir: Path, out: Path) -> float:
    """One preset through the pretraining bundle; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE),
           "--config_file", "[" + ",".join(f"'{f}'" for f in _config_files(preset)) + "]"]
    for key, value in _overrides(args, dataset_dir, out).items():
        cmd += [f"--{key}", str(value)]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "pretrain.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode:
        raise SystemExit(f"preset {preset}: pretraining failed (exit {proc.returncode}); see {out / 'pretrain.log'}")
    return time.perf_counter() - t0


def _recall_bootstrap(similarity: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    from workflows.retrieval import expected_ranks

    higher, tied = expected_ranks(similarity)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(higher), size=(n_bootstrap, len(higher)))
    out = {}
    for k in KS:
        hit = np.clip((k - higher) / tied, 0.0, 1.0)  # each query's expected hit over ties
        reps = hit[idx].mean(axis=1)
        out[k] = (float(hit.mean()), *np.quantile(reps, [0.025, 0.975]).tolist())
    return out


def evaluate(preset: str, args, dataset_dir: Path, out: Path) -> dict:
    """The preset's best model on the test split: the table's row."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader, Dataset

    from custom_nets import ZeroShotClassifier, load_checkpoint
    from transforms import load_datalist
    from workflows.metrics import bootstrap_auroc

    parser = ConfigParser()
    parser.read_config(_config_files(preset))
    parser.update({"bundle_root": str(BUNDLE), **_overrides(args, dataset_dir, out)})
    net = parser.get_parsed_content("network_def").eval()
    model = net.model
    load_checkpoint(model, out / "models" / "model.pt")
    if len(net.heads):
        net.heads.load_state_dict(torch.load(out / "models" / "heads.pt", map_location="cpu", weights_only=True))
    head = net.heads["salience"] if "salience" in net.heads else None
    items = load_datalist(dataset_dir, "test", max_items=args.max_items or None)
    loader = DataLoader(Dataset(items, parser.get_parsed_content("validate#preprocessing")), batch_size=1,
                        num_workers=args.num_workers)
    zero_shot = ZeroShotClassifier.from_config(model, model.config, parser.get_parsed_content("tokenizer")).eval()

    def image_latent(x, selection=None):
        encoding = model.image_encoding(x)
        if head is None:
            return torch.nn.functional.normalize(model.to_visual_latent(encoding.embedding), dim=-1), 1.0
        latent, selected = head(encoding.tokens, selection)
        return latent, float(selected.kept_ratio)

    images, texts, labels, kept, seconds, seconds_all = [], [], [], [], [], []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            x = batch["image"].float()
            if i == 0:
                image_latent(x)  # warm-up
            t0 = time.perf_counter()
            latent, ratio = image_latent(x)
            seconds.append(time.perf_counter() - t0)
            if head is not None and head.selection == "hard_topk":
                t0 = time.perf_counter()
                image_latent(x, "none")  # the same model on every token: the drop's speed-up
                seconds_all.append(time.perf_counter() - t0)
            images.append(latent)
            kept.append(ratio)
            texts.append(model.encode_text(batch["input_ids"], batch["attention_mask"]))
            labels.append(batch["label"])
        img, txt = torch.cat(images), torch.cat(texts)
        probs = zero_shot.probabilities(img).numpy()
    y = torch.cat(labels).numpy()
    auc = bootstrap_auroc(y, probs, n_bootstrap=args.n_bootstrap, seed=args.seed)["macro"]
    recall = _recall_bootstrap((img @ txt.t()).numpy().T, args.n_bootstrap, args.seed)  # rows: report queries
    row = {"preset": preset, "variant": PRESETS[preset], "n_test": len(items),
           "macro_auroc": [auc["auroc"], auc["ci_low"], auc["ci_high"]],
           **{f"r2v_recall@{k}": list(v) for k, v in recall.items()},
           "kept_ratio": float(np.mean(kept)), "seconds_per_volume": float(np.median(seconds))}
    if seconds_all:
        row["seconds_per_volume_all_tokens"] = float(np.median(seconds_all))
    return row


def _ci(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def table(rows: list[dict]) -> str:
    """The ablation as one markdown table."""
    lines = ["| variant | zero-shot macro AUROC [95% CI] | R@1 | R@5 | R@10 | kept tokens | s / volume |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} {r['variant']} | {_ci(r['macro_auroc'])} | {_ci(r['r2v_recall@1'])} | "
                     f"{_ci(r['r2v_recall@5'])} | {_ci(r['r2v_recall@10'])} | {r['kept_ratio']:.3f} | "
                     f"{r['seconds_per_volume']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True, help="ct_preprocess output folder, or the demo output folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_config", default="ctclip_small")
    parser.add_argument("--presets", default="ABCDE")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=0, help="0: the bundle's")
    parser.add_argument("--max_items", type=int, default=0, help="cap on the training, validation and test items")
    parser.add_argument("--n_bootstrap", type=int, default=1000)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_training", action="store_true", help="evaluate runs already in output_dir")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    dataset_dir, out = _dataset_dir(Path(args.dataset_dir)), Path(args.output_dir)
    rows = []
    for preset in args.presets.upper():
        if preset not in PRESETS:
            raise SystemExit(f"unknown preset {preset!r}; presets: {''.join(PRESETS)}")
        run_dir = out / preset
        train_s = None if args.skip_training else pretrain(preset, args, dataset_dir, run_dir)
        row = evaluate(preset, args, dataset_dir, run_dir)
        row["pretrain_seconds"] = train_s
        rows.append(row)
        print(f"{preset}: {json.dumps(row)}", flush=True)
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    print()
    print(f"Patch-IB ablation: {args.model_config}, {args.epochs} epoch(s), {rows[0]['n_test']} test volumes, "
          f"{args.n_bootstrap} bootstrap resamples; report -> volume recall")
    print(table(rows))
    for r in rows:
        if "seconds_per_volume_all_tokens" in r:
            print(f"{r['preset']}: the hard drop {r['seconds_per_volume']:.4f} s / volume, the same model on every "
                  f"token {r['seconds_per_volume_all_tokens']:.4f} s (x{r['seconds_per_volume_all_tokens'] / r['seconds_per_volume']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
