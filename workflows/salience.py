"""Patch-IB salience you can look at: each volume's token salience as a NIfTI on the preprocessed volume's grid (it
opens over the CT in 3D Slicer or ITK-SNAP), a PNG overlay on a few axial slices, and how much of the salience mass
falls on the true finding regions of the synthetic cohort.

- :func:`salience_on_model_grid`: token salience ``(N,)`` with the tokens' ``positions`` to a volume on the model
  input's voxel grid (each voxel takes the value of the nearest token centre);
- :func:`to_stored_grid`: a model-grid volume back onto the stored (preprocessed) volume's axes, so the NIfTI carries
  the stored file's affine unchanged;
- :func:`salience_mass_on_findings`: the share of the salience mass inside the finding masks against the share of
  the volume they fill (the chance level of a salience map that knows nothing);
- :class:`SalienceWriter`: an evaluator handler (the zero-shot bundle's ``configs/salience.json``) that does all of it
  for every volume and writes ``salience_summary.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.data import decollate_batch
from torch import nn

from ctclip_contract import CTRATE_PATHOLOGIES, atomic_path
from ctclip_contract.anatomy import mask_paths

from custom_nets.patch_ib import PatchIBHead

from .writers import write_json
from .zeroshot import find_clip_model

__all__ = ["salience_on_model_grid", "to_stored_grid", "salience_mass_on_findings", "write_salience_nifti",
           "radiological_view", "write_salience_overlay", "load_salience_head", "SalienceWriter"]

logger = logging.getLogger(__name__)

def _axis_centres(values: torch.Tensor) -> torch.Tensor:
    return torch.unique(values.round(decimals=4))


def salience_on_model_grid(salience: torch.Tensor, positions: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Token salience ``(N,)`` as a volume ``shape`` ``(D, H, W)`` on the model input's grid.

    Each voxel takes the value of the nearest token centre (``positions`` ``(N, 3)``, model-input voxels, ``(d, h,
    w)``). Tokens on a regular grid (CTViT's ``t x h x w``, the slice-fusion encoder's one token per slice) are
    looked up axis by axis; other layouts by a nearest-centre search in chunks.
    """
    d, h, w = (int(s) for s in shape)
    salience, positions = salience.detach().float().cpu(), positions.detach().float().cpu()
    axes = [_axis_centres(positions[:, i]) for i in range(3)]
    voxel = [torch.arange(n, dtype=torch.float32) + 0.5 for n in (d, h, w)]
    if int(np.prod([len(a) for a in axes])) == salience.numel():
        # a full grid: each voxel's nearest centre along each axis
        nearest = [(v[:, None] - a[None, :]).abs().argmin(1) for v, a in zip(voxel, axes)]
        index = [torch.searchsorted(a, positions[:, i].round(decimals=4)) for i, a in enumerate(axes)]
        grid = torch.full([len(a) for a in axes], float("nan"))
        grid[index[0], index[1], index[2]] = salience
        return grid[nearest[0][:, None, None], nearest[1][None, :, None], nearest[2][None, None, :]]
    centres = torch.stack(torch.meshgrid(*voxel, indexing="ij"), -1).reshape(-1, 3)
    out = torch.empty(centres.shape[0])
    for start in range(0, centres.shape[0], 65536):
        chunk = centres[start:start + 65536]
        out[start:start + 65536] = salience[torch.cdist(chunk, positions).argmin(1)]
    return out.reshape(d, h, w)


def to_stored_grid(volume: np.ndarray, model_axis_codes: str, stored_affine: np.ndarray) -> np.ndarray:
    """A volume on the model input's axes (``axis_codes`` of the input contract, e.g. ``"SLP"``) back onto the axes
    of the stored volume whose affine is ``stored_affine``: the inverse of the reorientation of
    :class:`transforms.ToModelInput` (a permutation and flips; the voxels are the same)."""
    model = nib.orientations.axcodes2ornt(tuple(model_axis_codes.upper()))
    stored = nib.orientations.io_orientation(np.asarray(stored_affine))
    return nib.orientations.apply_orientation(np.asarray(volume), nib.orientations.ornt_transform(model, stored))


def salience_mass_on_findings(salience: np.ndarray, findings: np.ndarray,
                              class_names: Sequence[str] = CTRATE_PATHOLOGIES) -> dict[str, Any]:
    """How much of the salience mass lies on the finding regions, against the share of the volume they fill.

    Args:
        salience: non-negative salience on the grid of ``findings``.
        findings: int bit field: bit ``i`` set where pathology ``i`` of ``class_names`` is drawn.
        class_names: the pathologies in bit order (:data:`ctclip_contract.CTRATE_PATHOLOGIES`).

    Returns:
        ``{"mass_fraction", "volume_fraction", "lift", "per_class": {name: {...}}}``: ``mass_fraction`` the share of
        the salience on any finding voxel, ``volume_fraction`` the share of voxels that are finding voxels (what a
        uniform map would give), ``lift`` their ratio; ``per_class`` the same for each pathology drawn in the volume.
        None values where the volume has no finding voxel.
    """
    s = np.asarray(salience, dtype=np.float64)
    f = np.asarray(findings).astype(np.int64)
    if s.shape != f.shape:
        raise ValueError(f"salience {s.shape} and finding mask {f.shape} are not on one grid")
    total = s.sum()

    def part(region: np.ndarray) -> dict[str, Optional[float]]:
        vol = float(region.mean())
        if not region.any() or total <= 0:
            return {"mass_fraction": None, "volume_fraction": vol, "lift": None}
        mass = float(s[region].sum() / total)
        return {"mass_fraction": mass, "volume_fraction": vol, "lift": mass / vol}

    out: dict[str, Any] = part(f != 0)
    out["per_class"] = {name: part((f >> i) & 1 == 1) for i, name in enumerate(class_names) if ((f >> i) & 1).any()}
    return out


def write_salience_nifti(path: str | os.PathLike, volume: np.ndarray, affine: np.ndarray) -> Path:
    """Salience as float32 NIfTI with ``affine`` (the stored volume's), written atomically."""
    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp) + ".nii.gz")
        os.replace(str(tmp) + ".nii.gz", tmp)
    return Path(path)


def radiological_view(axial: np.ndarray, axis_codes: str = "SLP") -> np.ndarray:
    """An axial slice ``(H, W)`` of a model input with axis codes ``axis_codes`` (``D, H, W``), as radiologists look
    at it: anterior at the top, the patient's right on the image's left (rows run to posterior, columns to left).

    Raises:
        ValueError: the in-plane axes are not one left-right and one anterior-posterior axis.
    """
    codes = axis_codes.upper()[1:]
    lr = next((i for i, c in enumerate(codes) if c in "LR"), None)
    ap = next((i for i, c in enumerate(codes) if c in "AP"), None)
    if len(codes) != 2 or lr is None or ap is None:
        raise ValueError(f"axis codes {axis_codes!r}: the H and W axes of an axial slice must be L/R and A/P")
    view = np.asarray(axial).transpose(ap, lr)
    return view[:: 1 if codes[ap] == "P" else -1, :: 1 if codes[lr] == "L" else -1]


def write_salience_overlay(path: str | os.PathLike, image: np.ndarray, salience: np.ndarray, n_slices: int = 3,
                           title: str = "", slices: Optional[Sequence[int]] = None,
                           outline: Optional[np.ndarray] = None, axis_codes: str = "SLP") -> Path:
    """PNG of ``n_slices`` axial slices (first axis, the model input's depth) of ``image`` with the salience over it
    in colour (from its minimum to its maximum): the slices with the most salience mass, or ``slices`` when given.
    ``outline``: an optional bool volume on the same grid drawn as a contour (e.g. a finding's mask). The slices are
    shown as radiologists read them (:func:`radiological_view` of the model input's ``axis_codes``). Needs
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mass = salience.reshape(salience.shape[0], -1).sum(1)
    picks = sorted(np.argsort(mass)[::-1][:n_slices].tolist()) if slices is None else [int(k) for k in slices]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4), squeeze=False)
    # the colour spans the map's own range: a mask that barely varies still shows where it is higher
    vmin, vmax = float(salience.min()), float(salience.max())
    vmax = vmax if vmax > vmin else vmin + 1e-6
    for ax, k in zip(axes[0], picks):
        ax.imshow(radiological_view(image[k], axis_codes), cmap="gray")
        ax.imshow(radiological_view(salience[k], axis_codes), cmap="inferno", alpha=0.45, vmin=vmin, vmax=vmax)
        if outline is not None and np.asarray(outline[k]).any():
            ax.contour(radiological_view(np.asarray(outline[k], dtype=float), axis_codes), levels=[0.5],
                       colors="cyan", linewidths=1.0)
        ax.set_title(f"slice {k}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)


def load_salience_head(path: str | os.PathLike, token_dim: int, dim_latent: int, **settings) -> PatchIBHead:
    """The Patch-IB salience head of a pretraining run from its ``models/heads.pt`` (the ``salience.*`` entries).

    Args:
        path: the heads file.
        token_dim: the image encoder's token width.
        dim_latent: the CLIP latent width.
        **settings: :class:`~custom_nets.patch_ib.PatchIBHead` settings (``selection``, ``topk_ratio``, ...).

    Raises:
        FileNotFoundError, ValueError: naming the file, when it is missing or holds no salience head.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Patch-IB heads file (a pretraining run with sparse_weight or cons_weight "
                                f"> 0 writes models/heads.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    sub = {k[len("salience."):]: v for k, v in state.items() if k.startswith("salience.")}
    if not sub:
        raise ValueError(f"{path}: holds no salience head (keys {sorted(state)[:6]}...): the run had no Patch-IB mask")
    head = PatchIBHead(token_dim, dim_latent, **settings)
    head.load_state_dict(sub)
    return head.eval()


def _item_path(item: Mapping[str, Any], key: str) -> Optional[str]:
    value = item.get(key)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return str(value) if isinstance(value, (str, os.PathLike)) and str(value) else None


class SalienceWriter:
    """Evaluator handler: after each iteration, each volume's Patch-IB salience as ``<name>_salience.nii.gz`` on the
    stored volume's grid and affine, ``<name>_salience.png`` over ``png_slices`` slices, and, where the item (or the
    folder beside its volume) has a finding mask, the salience mass on the findings; at the end
    ``salience_summary.json`` with the per-volume rows and their means.

    Args:
        network: the evaluator's network (its :class:`~custom_nets.CTCLIP` is found inside).
        heads_path: the pretraining run's ``models/heads.pt``.
        output_dir: where the files go.
        axis_codes: the model input's axis codes (the model config's ``input.axis_codes``).
        findings_key: the item key of the finding-mask path (preprocessed cohorts: ``findings_mask``); without it
            ``<stem>_findings.nii.gz`` beside the volume is used when it exists.
        png_slices: slices in the PNG (0: no PNG).
        image_key: the batch key of the model input.
    """

    def __init__(self, network: nn.Module, heads_path: str | os.PathLike, output_dir: str | os.PathLike,
                 axis_codes: str = "SLP", findings_key: str = "findings_mask", png_slices: int = 3,
                 image_key: str = "image"):
        self.model = find_clip_model(network)
        vt = self.model.visual_transformer
        if getattr(vt, "token_dim", None) is None:
            raise ValueError(f"salience maps need an image encoder that gives tokens; {type(vt).__name__} gives none")
        self.head = load_salience_head(heads_path, vt.token_dim, self.model.dim_latent)
        self.output_dir = Path(output_dir)
        self.axis_codes, self.findings_key, self.png_slices = axis_codes, findings_key, int(png_slices)
        self.image_key = image_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write_summary)

    @torch.no_grad()
    def __call__(self, engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else decollate_batch(batch)
        device = self.model.temperature.device
        self.head.to(device)
        for item in items:
            image = item[self.image_key]
            x = torch.as_tensor(image, dtype=torch.float32, device=device)
            x = x.unsqueeze(0) if x.ndim == 4 else x
            encoding = self.model.image_encoding(x)
            salience = self.head.select(encoding.tokens).salience[0]
            self.rows.append(self.write_volume(item, image, salience, encoding.positions))

    def write_volume(self, item: Mapping[str, Any], image: Any, salience: torch.Tensor,
                     positions: torch.Tensor) -> dict[str, Any]:
        """Write one volume's files; returns its summary row."""
        meta = getattr(image, "meta", {}) or {}
        source = _item_path(meta, "filename_or_obj") or _item_path(item, "image")
        name = str(item.get("name") or Path(source or "volume").name.split(".")[0])
        if isinstance(item.get("name"), (list, tuple)):
            name = str(item["name"][0])
        grid = np.asarray(image)[0]
        model_grid = salience_on_model_grid(salience, positions, grid.shape).numpy()
        if source is None or not Path(source).is_file():
            raise ValueError(f"{name}: the salience NIfTI needs the stored volume's file for its affine; the batch "
                             f"names none (use a dataset_dir of preprocessed volumes)")
        stored = nib.load(source)
        on_stored = to_stored_grid(model_grid, self.axis_codes, stored.affine)
        if on_stored.shape != stored.shape[:3]:
            raise ValueError(f"{source}: salience on the stored grid is {on_stored.shape}, the volume is "
                             f"{stored.shape[:3]}: the model input was not the stored grid reoriented")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        nifti = write_salience_nifti(self.output_dir / f"{name}_salience.nii.gz", on_stored, stored.affine)
        row: dict[str, Any] = {"name": name, "nifti": nifti.name, "mean_salience": float(salience.mean())}
        if self.png_slices > 0:
            try:
                write_salience_overlay(self.output_dir / f"{name}_salience.png", grid, model_grid, self.png_slices,
                                       title=name, axis_codes=self.axis_codes)
                row["png"] = f"{name}_salience.png"
            except ImportError as err:
                logger.warning(f"salience overlay not drawn ({err})")
        findings = _item_path(item, self.findings_key)
        if findings is None and source.endswith(".nii.gz"):
            beside = mask_paths(source)["findings"]
            findings = str(beside) if beside.is_file() else None
        if findings is not None:
            mask = np.asarray(nib.load(findings).dataobj)
            row.update(salience_mass_on_findings(on_stored, mask))
        return row

    def write_summary(self, engine=None) -> Path:
        """``salience_summary.json``: every row and, over the volumes with findings, the mean mass and volume
        fractions."""
        with_findings = [r for r in self.rows if r.get("mass_fraction") is not None]
        summary: dict[str, Any] = {"n_volumes": len(self.rows), "n_with_findings": len(with_findings)}
        if with_findings:
            mass = float(np.mean([r["mass_fraction"] for r in with_findings]))
            vol = float(np.mean([r["volume_fraction"] for r in with_findings]))
            summary.update(mean_mass_fraction=mass, mean_volume_fraction=vol, lift=mass / vol if vol else None)
        summary["volumes"] = self.rows
        return write_json(self.output_dir / "salience_summary.json", summary)

