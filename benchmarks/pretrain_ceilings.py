"""Where zero-shot pretraining is capped on a cohort: the text side and the image side, measured apart.

Usage::

    .venv/bin/python benchmarks/pretrain_ceilings.py --dataset_dir demo_output/preprocessed \
        [--config ctclip_small] [--epochs 8] [--seed 0]

On the validation split of a ``ct_preprocess`` datalist, three macro AUROCs over the 18 labels:

* **text ceiling**: each validation report, encoded by the config's pretrained text encoder as in training
  (no training), scored against the config's prompt pairs with the config's zero-shot scoring,
  as if the report were the image. What a perfectly aligned image encoder could reach with these prompts before any
  text training (the pretraining bundle logs the same quantity per epoch as ``report_prompt_macro_auroc``).
* **image encoder, supervised**: the config's image encoder with a linear head trained from scratch with
  weighted BCE on the *labels* of the training split for ``--epochs`` (AdamW 3e-4, batch 8): an upper
  bound for what contrastive pretraining of this encoder can learn from this many volumes.
* **baseline, HU histograms**: L2-regularised logistic regression on 40-bin HU histograms of the 8 octants
  of the same model inputs: a linear model on regional intensity statistics, no learned features.

The ratio printed is the supervised encoder's AUROC over the histogram baseline's. Not part of the test
suite. Validation AUROCs on a few dozen volumes are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def macro(y: np.ndarray, s: np.ndarray) -> float:
    from workflows.metrics import macro_auroc

    return macro_auroc(y, s)[0]


def load_split(dataset_dir: str, split: str, config: str):
    import torch
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from transforms import CTVolumeReader, ReportTextd, ToModelInputd
    from transforms import load_datalist

    items = load_datalist(dataset_dir, split, require_labels=True)
    load = Compose([LoadImaged("image", reader=CTVolumeReader(), dtype=None), EnsureChannelFirstd("image"),
                    ToModelInputd.from_model_config("image", config), ReportTextd.from_model_config(config)])
    images, texts = [], []
    for item in items:
        d = load(dict(item))
        images.append(torch.as_tensor(d["image"]).float())
        texts.append(d["text"])
    labels = torch.tensor([item["label"] for item in items], dtype=torch.float32)
    return torch.stack(images), labels, texts


def text_ceiling(config: str, texts: list[str], labels: np.ndarray, seed: int) -> float:
    import torch

    import custom_nets as cn
    from transforms import TokenizeReportd

    torch.manual_seed(seed)  # the latent projection is freshly initialised
    model = cn.create_model(config).eval()
    zero_shot = cn.ZeroShotClassifier.from_config(model, config)
    # tokenized as in training (sentence rows for "sentence_mean" configs)
    tokenize = TokenizeReportd.from_model_config(config, tokenizer=zero_shot.tokenizer)
    with torch.no_grad():
        latents = []
        for k in range(0, len(texts), 16):
            tok = [tokenize({"text": t}) for t in texts[k:k + 16]]
            latents.append(model.encode_text(torch.stack([d["input_ids"] for d in tok]),
                                             torch.stack([d["attention_mask"] for d in tok])))
        probs = zero_shot.probabilities(torch.cat(latents)).numpy()
    return macro(labels, probs)


def supervised_encoder(config: str, xtr, ytr, xva, yva, epochs: int, seed: int) -> list[float]:
    import torch
    import torch.nn.functional as F

    import custom_nets as cn

    torch.manual_seed(seed)
    model = cn.create_model(config)
    encoder, dim = model.visual_transformer, model.dim_image
    head = torch.nn.Linear(dim, ytr.shape[1])

    def forward(x):
        return head(model.image_embedding(x))

    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)
    pos_weight = ((len(ytr) - ytr.sum(0)) / ytr.sum(0).clamp(min=1)).clamp(max=10)
    curve = []
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        for idx in torch.randperm(len(xtr)).split(8):
            loss = F.binary_cross_entropy_with_logits(forward(xtr[idx]), ytr[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            scores = torch.cat([forward(x) for x in xva.split(8)]).numpy()
        curve.append(macro(yva.numpy(), scores))
        print(f"  supervised encoder epoch {epoch + 1}: validation macro AUROC {curve[-1]:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    return curve


def octant_histograms(x) -> np.ndarray:
    edges = np.linspace(-1.0, 1.0, 41)  # model units: the config's HU window scaled to [-1, 1] for CT-CLIP
    feats = []
    for v in x[:, 0].numpy():
        f = [np.log1p(np.histogram(c, bins=edges)[0]) for a in np.array_split(v, 2, 0)
             for b in np.array_split(a, 2, 1) for c in np.array_split(b, 2, 2)]
        feats.append(np.concatenate(f))
    return np.asarray(feats)


def histogram_baseline(xtr, ytr, xva, yva, l2: float = 0.05) -> float:
    """One L2-regularised logistic regression per label (fitted jointly with LBFGS) on standardised features."""
    import torch
    import torch.nn.functional as F

    ftr, fva = (torch.as_tensor(octant_histograms(x), dtype=torch.float64) for x in (xtr, xva))
    mean, std = ftr.mean(0), ftr.std(0).clamp(min=1e-6)
    ftr, fva = (ftr - mean) / std, (fva - mean) / std
    y = ytr.double()
    weight = torch.zeros(ftr.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ftr @ weight + bias, y) + l2 * weight.pow(2).sum(0).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return macro(yva.numpy(), (fva @ weight + bias).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--config", default="ctclip_small")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    xtr, ytr, _ = load_split(args.dataset_dir, "training", args.config)
    xva, yva, texts = load_split(args.dataset_dir, "validation", args.config)
    print(f"{len(xtr)} training and {len(xva)} validation volumes of shape {tuple(xtr.shape[1:])}")
    results = {"text_ceiling": text_ceiling(args.config, texts, yva.numpy(), args.seed)}
    print(f"text ceiling (reports scored by the prompts, untrained text encoder): {results['text_ceiling']:.3f}")
    results["histogram_baseline"] = histogram_baseline(xtr, ytr, xva, yva)
    print(f"baseline, octant HU histograms + logistic regression: {results['histogram_baseline']:.3f}")
    curve = supervised_encoder(args.config, xtr, ytr, xva, yva, args.epochs, args.seed)
    results.update(supervised_encoder_curve=curve, supervised_encoder_best=max(curve))
    results["ratio_encoder_to_baseline"] = max(curve) / results["histogram_baseline"]
    print(f"image encoder supervised on the labels, best of {args.epochs} epochs: {max(curve):.3f} "
          f"= {results['ratio_encoder_to_baseline']:.2f}x the histogram baseline")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
