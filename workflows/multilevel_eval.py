"""What the multi-level alignment (#23) learned, read on held-out volumes with their masks: does a report sentence
find its own anatomical region, and does a finding's sentence look at the finding?

- **Region alignment accuracy** (:func:`single_region_sentences`, :func:`region_ranks`): each sentence of a test
  report (the sections the model was trained on) that names exactly one region of the lexicon
  (:func:`ctclip_contract.anatomy_lexicon.sentence_regions`), and whose region is in the volume's mask, is compared
  with the volume's region latents (``heads.regions`` over the encoder's ``regions``) of the regions its mask holds;
  a hit when its own region ranks first. Chance: one over the number of regions present, averaged over the
  sentences.
- **Localisation, pointing game** (:func:`token_cells`, :func:`pointing_game`): for each positive finding of a test
  volume whose finding mask has voxels of it on the model grid, the finding's zero-shot positive prompt
  (``"{} is observed."`` for ``ctspecialised_small``) attends over the patch tokens (``heads.sentence.attend``); a
  hit when the patch with the most attention overlaps the finding's mask. That is the usual tolerance of half a
  patch: the peak patch's centre lies inside the mask dilated by half a patch along each axis. Chance: the share of
  patches that overlap the mask (a patch picked at random). The attention mass on the mask against the mask's share
  of the volume (:func:`workflows.salience.salience_mass_on_findings`) is reported beside it.
- :class:`MultilevelEvaluation`: both over a data loader (the zero-shot bundle's ``configs/multilevel_eval.json``),
  with percentile-bootstrap CIs over volumes, a PNG of the attention over the slice through its peak with the
  finding's outline for a few cases, and ``metrics.json``.

The prompt rather than the report's own sentence: every positive finding has one, worded the same for every volume
(a report sentence may name several findings, or word one as the lexicon does not know), and it is the text the
zero-shot AUROC of the same table scores with.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import decollate_batch
from torch import nn

from ctclip_contract import CTRATE_PATHOLOGIES
from ctclip_contract.anatomy import ANATOMY_REGIONS, REGION_IDS, finding_bit
from ctclip_contract.anatomy_lexicon import sentence_regions

from custom_nets import reads_segmentation
from custom_nets.losses import PretrainingLoss
from custom_nets.pretraining import PretrainingNetwork
from transforms import ReportTextd
from transforms.report_text import split_sentences

from .metrics import percentile_ci
from .salience import salience_mass_on_findings, salience_on_model_grid, write_salience_overlay
from .writers import write_json
from .zeroshot import find_clip_model

__all__ = ["load_multilevel_heads", "single_region_sentences", "region_ranks", "token_cells", "pointing_game",
           "bootstrap_rate", "MultilevelEvaluation"]

logger = logging.getLogger(__name__)


def load_multilevel_heads(path: str | os.PathLike, model: nn.Module) -> nn.ModuleDict:
    """The region and sentence heads of a pretraining run with the multi-level alignment (its ``models/heads.pt``),
    built as the pretraining network builds them for ``model``.

    Args:
        path: the heads file.
        model: the :class:`~custom_nets.CTCLIP` the heads were trained with.

    Returns:
        ``ModuleDict`` with ``regions`` (region embedding to the latent space) and ``sentence``
        (:class:`~custom_nets.multilevel_alignment.SentencePatchLoss`), in eval mode.

    Raises:
        FileNotFoundError, ValueError: naming the file, when it is missing or holds no region or sentence head, or
            when the model cannot have such heads (an encoder without masks, reports not pooled by sentence).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no heads file (a pretraining run with region_weight and sentence_weight > 0, "
                                f"configs/multilevel.json, writes models/heads.pt)")
    heads = PretrainingNetwork(model, PretrainingLoss(region_weight=1.0, sentence_weight=1.0)).heads
    state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = {k: v for k, v in state.items() if k.split(".", 1)[0] in ("regions", "sentence")}
    missing = sorted(set(heads.state_dict()) - set(wanted))
    if missing:
        raise ValueError(f"{path}: holds no multi-level heads {missing} (keys {sorted(state)[:6]}...): the run had "
                         f"region_weight or sentence_weight 0")
    heads.load_state_dict(wanted)
    return heads.eval()


def single_region_sentences(text: str) -> list[tuple[str, str]]:
    """The sentences of a report (:func:`transforms.report_text.split_sentences`) that name exactly one anatomical
    region, each with that region: ``[(sentence, region), ...]``."""
    out = []
    for sentence in split_sentences(str(text)):
        regions = sentence_regions(sentence)
        if len(regions) == 1:
            out.append((sentence, next(iter(regions))))
    return out


def region_ranks(sentence_latents: torch.Tensor, region_latents: torch.Tensor, present: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """Rank of each sentence's own region among the regions present in the volume (1: first).

    Args:
        sentence_latents: ``(S, D)`` l2-normalised.
        region_latents: ``(R, D)`` l2-normalised (row ``r``: region id ``r + 1``).
        present: ``(R,)`` bool, the region is in the volume's mask; absent regions are not candidates.
        targets: ``(S,)`` region row of each sentence; each must be present.

    Returns:
        ``(S,)`` long ranks; a tie with another present region counts against the sentence.

    Raises:
        ValueError: a target region is absent.
    """
    present = present.bool()
    if not bool(present[targets].all()):
        raise ValueError("region_ranks: every sentence's own region must be present in the volume's mask")
    sims = sentence_latents @ region_latents.t()  # (S, R)
    own = sims.gather(1, targets[:, None])
    rivals = (sims >= own) & present[None, :]
    rivals[torch.arange(len(targets)), targets] = False
    return 1 + rivals.sum(1)


def token_cells(positions: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """Which token each voxel of the model input belongs to (its nearest token centre): ``(D, H, W)`` int64 token
    indices, the upsampling of :func:`workflows.salience.salience_on_model_grid` applied to the indices."""
    index = torch.arange(positions.shape[0], dtype=torch.float32)
    return salience_on_model_grid(index, positions, shape).round().long().numpy()


def pointing_game(attention: torch.Tensor | np.ndarray, cells: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """Whether the token with the most attention lies on a mask.

    Args:
        attention: ``(N,)`` attention weights over the tokens.
        cells: ``(D, H, W)`` token index of each voxel (:func:`token_cells`).
        mask: ``(D, H, W)`` bool, the finding's voxels on the same grid.

    Returns:
        ``{"hit", "peak_token", "chance", "chance_voxels"}``: ``hit`` the peak token's patch holds a mask voxel (its
        centre lies in the mask dilated by half a patch); ``chance`` the share of tokens whose patch holds one (a
        token picked at random); ``chance_voxels`` the mask's share of the volume.

    Raises:
        ValueError: the mask is empty, or the grids differ.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != cells.shape:
        raise ValueError(f"pointing_game: mask {mask.shape} and token cells {cells.shape} are not on one grid")
    if not mask.any():
        raise ValueError("pointing_game: the mask is empty")
    attention = torch.as_tensor(attention).detach().float().cpu()
    peak = int(attention.argmax())
    on_mask = np.unique(cells[mask])
    return {"hit": bool(np.isin(peak, on_mask)), "peak_token": peak, "chance": on_mask.size / attention.numel(),
            "chance_voxels": float(mask.mean())}


def bootstrap_rate(hits: np.ndarray, counts: np.ndarray, n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95,
                   macro: bool = False) -> tuple[float, float, float]:
    """A hit rate with its percentile bootstrap interval, volumes resampled with replacement.

    Args:
        hits: ``(V,)`` hits per volume, or ``(V, K)`` per volume and class.
        counts: the trials, same shape.
        n_bootstrap: resamples.
        seed: seed of ``numpy.random.default_rng``.
        ci: confidence level.
        macro: with ``(V, K)``: the mean over the classes of each class's rate (the classes with a trial in the
            data; a resample missing one of them is skipped, as the macro AUROC does); otherwise pooled.

    Returns:
        ``(rate, ci_low, ci_high)``; NaN without any trial.
    """
    hits, counts = np.asarray(hits, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if hits.shape != counts.shape or hits.ndim not in (1, 2):
        raise ValueError(f"bootstrap_rate: hits {hits.shape} and counts {counts.shape} must be (V,) or (V, K) alike")
    if hits.ndim == 1:
        hits, counts = hits[:, None], counts[:, None]
    included = counts.sum(0) > 0

    def rate(h: np.ndarray, c: np.ndarray) -> np.ndarray:  # (..., K) sums -> (...)
        if not macro:
            total = c.sum(-1)
            return np.where(total > 0, h.sum(-1) / np.where(total > 0, total, 1.0), np.nan)
        h, c = h[..., included], c[..., included]
        per = np.where(c > 0, h / np.where(c > 0, c, 1.0), np.nan)
        return per.mean(-1)  # NaN where a class had no trial in the resample

    if not included.any():
        return float("nan"), float("nan"), float("nan")
    point = float(rate(hits.sum(0), counts.sum(0)))
    n = hits.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    low, high = percentile_ci(rate(hits[idx].sum(1), counts[idx].sum(1)), ci)
    return point, low, high


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


class MultilevelEvaluation:
    """Region alignment accuracy and the pointing game of a model pretrained with the multi-level alignment, over
    the volumes of a data loader that carries each volume's anatomical mask and finding mask on the model grid.

    Writes ``metrics.json`` (atomically) and ``<name>_<finding>_attention.png`` for the first ``png_cases``
    (volume, finding) pairs into ``output_dir``.

    Args:
        network: the zero-shot network (:class:`~custom_nets.ZeroShotClassifier`: its CT-CLIP, tokenizer, prompt
            templates and class names are used); the CT-CLIP's encoder must read anatomical masks.
        heads_path: the pretraining run's ``models/heads.pt`` (:func:`load_multilevel_heads`).
        dataloader: batches of ``image``, ``seg_key``, ``findings_key`` (model grid), ``label`` and the report
            sections.
        output_dir: where ``metrics.json`` and the PNGs go.
        device: where the model runs (default: the model's).
        report_sections: the report sections whose sentences are read (default: the model config's
            ``text.report_sections``, the ones it was trained on).
        n_bootstrap: bootstrap resamples of the CIs.
        ci: confidence level.
        seed: bootstrap seed.
        png_cases: (volume, finding) pairs drawn as PNG (0: none; needs matplotlib).
        image_key / seg_key / findings_key / label_key: batch keys.
    """

    def __init__(self, network: nn.Module, heads_path: str | os.PathLike, dataloader: Iterable,
                 output_dir: str | os.PathLike, device: Optional[torch.device | str] = None,
                 report_sections: Optional[Sequence[str]] = None, n_bootstrap: int = 1000, ci: float = 0.95,
                 seed: int = 0, png_cases: int = 4, image_key: str = "image", seg_key: str = "seg",
                 findings_key: str = "findings_mask", label_key: str = "label"):
        self.model = find_clip_model(network)
        if not reads_segmentation(self.model):
            raise ValueError(f"region alignment and localisation need an image encoder that reads anatomical masks; "
                             f"{type(self.model.visual_transformer).__name__} reads none")
        for attr in ("tokenizer", "templates", "class_names"):
            if not hasattr(network, attr):
                raise TypeError(f"MultilevelEvaluation takes the zero-shot network (its prompts and tokenizer); "
                                f"{type(network).__name__} has no {attr!r}")
        self.tokenizer = network.tokenizer
        self.template = network.templates[0][0]  # the positive prompt of the first pair
        self.prompts = [self.template.format(name) for name in network.class_names]
        self.columns = list(getattr(network, "column_names", network.class_names))
        self.heads = load_multilevel_heads(heads_path, self.model)
        self.dataloader, self.output_dir = dataloader, Path(output_dir)
        self.device = torch.device(device) if device is not None else self.model.temperature.device
        config = self.model.config
        self.max_length = config.text.max_length
        self.report_text = (ReportTextd.from_model_config(config) if report_sections is None
                            else ReportTextd.from_model_config(config, sections=report_sections))
        self.n_bootstrap, self.ci, self.seed, self.png_cases = int(n_bootstrap), float(ci), int(seed), int(png_cases)
        self.image_key, self.seg_key, self.findings_key, self.label_key = image_key, seg_key, findings_key, label_key

    # -------------------------------------------------------------------------------------------- text
    def sentence_latents(self, sentences: Sequence[str]) -> torch.Tensor:
        """``(S, dim_latent)`` l2-normalised latents of sentences, each encoded on its own as in pretraining."""
        tok = self.tokenizer(list(sentences), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device, torch.long)[None]
        mask = tok["attention_mask"].to(self.device, torch.long)[None]
        embeddings, _ = self.model.sentence_embeddings(ids, mask)
        return F.normalize(self.model.to_text_latent(embeddings[0]), dim=-1)

    # ------------------------------------------------------------------------------------------- volumes
    @torch.no_grad()
    def run(self) -> dict[str, Any]:
        """Evaluate every volume of the loader; write and return the metrics."""
        self.model.eval()
        self.heads.to(self.device)
        prompt_latents = self.sentence_latents(self.prompts)  # (F, D)
        rows: list[dict[str, Any]] = []
        figures: list[str] = []
        for batch in self.dataloader:
            for key in (self.seg_key, self.findings_key):
                if key not in batch:
                    raise KeyError(f"the batch has no {key!r}: give --dataset_dir of a ct_preprocess output with "
                                   f"masks (mask_keys {[self.seg_key, self.findings_key]})")
            # plain tensors: a collated MetaTensor's metadata does not follow the slicing below
            image = torch.as_tensor(batch[self.image_key]).as_subclass(torch.Tensor).to(self.device, torch.float32)
            seg = torch.as_tensor(batch[self.seg_key]).as_subclass(torch.Tensor).to(self.device)
            encoding = self.model.image_encoding(image, seg)
            weights = None
            if encoding.tokens is not None:
                _, weights = self.heads["sentence"].attend(
                    encoding.tokens, prompt_latents[None].expand(image.shape[0], -1, -1))  # (B, F, N)
            region_latents = (None if encoding.regions is None
                              else F.normalize(self.heads["regions"](encoding.regions), dim=-1))
            for b, item in enumerate(decollate_batch(batch)):
                row = self._volume(item, image[b, 0], encoding, b, region_latents, weights, figures)
                rows.append(row)
        if not any(r["has_mask"] for r in rows):
            raise ValueError(f"none of the {len(rows)} volumes came with an anatomical mask: give --dataset_dir of a "
                             f"ct_preprocess output whose datalist names seg and findings_mask")
        return self.write(rows, figures)

    def _volume(self, item: Mapping[str, Any], image: torch.Tensor, encoding, b: int,
                region_latents: Optional[torch.Tensor], weights: Optional[torch.Tensor],
                figures: list[str]) -> dict[str, Any]:
        name = item.get("name", "volume")
        name = str(name[0] if isinstance(name, (list, tuple)) else name)
        present = None if encoding.region_mask is None else encoding.region_mask[b]
        row: dict[str, Any] = {"name": name, "has_mask": bool(present is not None and present.any()),
                               "sentences": [], "findings": [], "skipped_sentences": {}}
        if not row["has_mask"]:
            return row  # regions off for this volume: no region embedding to rank, no mask to point at
        # region alignment: the report's single-region sentences whose region the mask holds
        text = self.report_text(dict(item))["text"]
        pairs = []
        for sentence, region in single_region_sentences(text):
            if bool(present[REGION_IDS[region] - 1]):
                pairs.append((sentence, region))
            else:
                row["skipped_sentences"][region] = row["skipped_sentences"].get(region, 0) + 1
        if pairs:
            targets = torch.as_tensor([REGION_IDS[r] - 1 for _, r in pairs], device=present.device)
            ranks = region_ranks(self.sentence_latents([s for s, _ in pairs]), region_latents[b], present, targets)
            n_present = int(present.sum())
            row["sentences"] = [{"sentence": s, "region": r, "rank": int(k), "n_regions": n_present}
                                for (s, r), k in zip(pairs, ranks.tolist())]
        # localisation: each positive finding with voxels in the finding mask
        labels = item.get(self.label_key)
        finding_map = item.get(self.findings_key)
        if labels is None or finding_map is None or weights is None:
            return row
        labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
        bits = np.asarray(torch.as_tensor(finding_map).cpu()).astype(np.int64)[0]  # (D, H, W) finding bits
        cells = None
        for f, column in enumerate(self.columns):
            if f >= labels.size or labels[f] < 0.5 or column not in CTRATE_PATHOLOGIES:
                continue
            mask = (bits & finding_bit(column)) != 0
            if not mask.any():
                row["findings"].append({"finding": column, "in_mask": False})
                continue
            if cells is None:
                cells = token_cells(encoding.positions.cpu(), bits.shape)
            attention = weights[b, f].float().cpu()
            game = pointing_game(attention, cells, mask)
            grid = salience_on_model_grid(attention, encoding.positions, bits.shape).numpy()
            mass = salience_mass_on_findings(grid, mask.astype(np.int64), class_names=(column,))
            row["findings"].append({"finding": column, "in_mask": True, **game,
                                    "mass_fraction": mass["mass_fraction"]})
            if len(figures) < self.png_cases and "figure" not in row:  # one per volume: a few different cases
                figure = self._figure(name, column, image, grid, mask, encoding.positions[game["peak_token"]],
                                      game["hit"])
                if figure:
                    figures.append(figure)
                    row["figure"] = figure
        return row

    def _figure(self, name: str, finding: str, image: torch.Tensor, grid: np.ndarray, mask: np.ndarray,
                peak: torch.Tensor, hit: bool) -> Optional[str]:
        """The attention over the axial slice through its peak, the finding's outline over it, and beside it the
        slice where the finding is largest when that is another one (a miss then shows where it should have
        looked)."""
        depth = int(min(max(float(peak[0]), 0), grid.shape[0] - 1))
        largest = int(mask.reshape(mask.shape[0], -1).sum(1).argmax())
        file = f"{name}_{_slug(finding)}_attention.png"
        where = f"peak on slice {depth}" + (f", finding largest on slice {largest}" if largest != depth else "")
        try:
            write_salience_overlay(self.output_dir / file, np.asarray(image.cpu()), grid,
                                   slices=sorted({depth, largest}), outline=mask,
                                   axis_codes=self.model.config.input.axis_codes,
                                   title=f"{name}: \"{self.template.format(finding)}\" {'hit' if hit else 'miss'} "
                                         f"({where})")
        except ImportError as err:
            logger.warning(f"attention picture not drawn ({err})")
            return None
        return file

    # --------------------------------------------------------------------------------------------- summary
    def summarise(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The metrics of the per-volume rows of :meth:`run` (no file written)."""
        boot = {"n_bootstrap": self.n_bootstrap, "seed": self.seed, "ci": self.ci}
        masked = [r for r in rows if r["has_mask"]]
        # region alignment, pooled over sentences, CI over volumes
        with_sentences = [r for r in masked if r["sentences"]]
        hits = np.array([sum(s["rank"] == 1 for s in r["sentences"]) for r in with_sentences], dtype=float)
        counts = np.array([len(r["sentences"]) for r in with_sentences], dtype=float)
        accuracy, low, high = bootstrap_rate(hits, counts, **boot)
        sentences = [s for r in with_sentences for s in r["sentences"]]
        per_region = {}
        for region in ANATOMY_REGIONS:
            mine = [s for s in sentences if s["region"] == region]
            if mine:
                per_region[region] = {"accuracy": float(np.mean([s["rank"] == 1 for s in mine])), "n": len(mine),
                                      "chance": float(np.mean([1.0 / s["n_regions"] for s in mine]))}
        absent: dict[str, int] = {}
        for r in masked:
            for region, n in r["skipped_sentences"].items():
                absent[region] = absent.get(region, 0) + n
        region = {
            "accuracy": accuracy, "ci_low": low, "ci_high": high, "n_sentences": len(sentences),
            "n_volumes": len(with_sentences),
            "chance": float(np.mean([1.0 / s["n_regions"] for s in sentences])) if sentences else None,
            "mean_rank": float(np.mean([s["rank"] for s in sentences])) if sentences else None,
            "report_sections": list(self.report_text.keys),
            "sentences_region_absent": absent, "per_region": per_region,
        }
        # localisation: per finding and macro, CI over volumes
        pairs = [f for r in masked for f in r["findings"] if f["in_mask"]]
        names = [c for c in self.columns if any(f["finding"] == c for f in pairs)]
        matrix = np.zeros((len(masked), len(names), 2))
        for v, r in enumerate(masked):
            for f in r["findings"]:
                if f["in_mask"]:
                    matrix[v, names.index(f["finding"])] += (float(f["hit"]), 1.0)
        volumes = matrix[:, :, 1].sum(1) > 0
        matrix = matrix[volumes]
        macro, macro_low, macro_high = bootstrap_rate(matrix[..., 0], matrix[..., 1], macro=True, **boot)
        micro, micro_low, micro_high = bootstrap_rate(matrix[..., 0].sum(1), matrix[..., 1].sum(1), **boot)
        per_class = {}
        for c in names:
            mine = [f for f in pairs if f["finding"] == c]
            masses = [f["mass_fraction"] for f in mine if f["mass_fraction"] is not None]
            per_class[c] = {"hit_rate": float(np.mean([f["hit"] for f in mine])), "n": len(mine),
                            "chance": float(np.mean([f["chance"] for f in mine])),
                            "chance_voxels": float(np.mean([f["chance_voxels"] for f in mine])),
                            "mass_fraction": float(np.mean(masses)) if masses else None}
        no_voxels: dict[str, int] = {}
        for r in masked:
            for f in r["findings"]:
                if not f["in_mask"]:
                    no_voxels[f["finding"]] = no_voxels.get(f["finding"], 0) + 1
        localisation = {
            "method": "pointing game: the patch with the most attention of the finding's positive prompt holds a "
                      "voxel of the finding's mask (its centre within the mask dilated by half a patch); chance: the "
                      "share of patches that hold one",
            "prompt_template": self.template,
            "hit_rate_macro": macro, "ci_low": macro_low, "ci_high": macro_high,
            "chance_macro": float(np.mean([p["chance"] for p in per_class.values()])) if per_class else None,
            "hit_rate_micro": micro, "micro_ci_low": micro_low, "micro_ci_high": micro_high,
            "chance_micro": float(np.mean([f["chance"] for f in pairs])) if pairs else None,
            "n_findings": len(pairs), "n_classes": len(names), "n_volumes": int(volumes.sum()),
            "positives_without_mask_voxels": no_voxels, "per_class": per_class,
        }
        return {"n_volumes": len(rows), "n_volumes_with_mask": len(masked), **boot,
                "bootstrap": "percentile bootstrap over volumes (resampled with replacement)",
                "region_alignment": region, "localisation": localisation}

    def write(self, rows: Sequence[Mapping[str, Any]], figures: Sequence[str] = ()) -> dict[str, Any]:
        """``metrics.json`` with the summary, the figures and the per-volume rows."""
        metrics = {**self.summarise(rows), "figures": list(figures), "volumes": list(rows)}
        write_json(self.output_dir / "metrics.json", metrics)
        ra, lo = metrics["region_alignment"], metrics["localisation"]
        logger.info(f"region alignment accuracy {_fmt(ra['accuracy'])} over {ra['n_sentences']} sentences "
                    f"(chance {_fmt(ra['chance'])}); pointing game {_fmt(lo['hit_rate_macro'])} macro over "
                    f"{lo['n_findings']} findings (chance {_fmt(lo['chance_macro'])}); "
                    f"{self.output_dir / 'metrics.json'}")
        return metrics


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.3f}"
