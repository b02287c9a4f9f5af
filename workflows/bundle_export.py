"""Pack a trained stage into a self-contained MONAI bundle that another group runs outside this repository.

The exported bundle (``export_dir``, and the same tree zipped as ``export_dir.zip``)::

    configs/inference.json     the source bundle's entry points, bundle_root ".", the model config embedded,
    configs/...                ctclip_contract.verify_bundle(@bundle_root) run first in initialize
    configs/metadata.json      MONAI metadata: the real network_data_format, exact package versions,
                               compatible_packages (accepted ranges) and files_sha256 (every file of models/)
    models/model.pt            state dict with the keys of network_def (weights_only loadable)
    models/model.ts            TorchScript, when the network traces and matches the eager outputs
    models/export.json         the export's checks (strict reload, TorchScript difference or why it was skipped)
    models/text_encoder/       text-encoder config.json and tokenizer (save_pretrained): no hub access needed
    models/thresholds.json     ClassFine: the thresholds fitted on validation
    models/calibration.json    the per-finding calibration fitted on validation, applied by inference.json
                               (ClassFine: required; zero-shot: when export.json is given --calibration_path)
    wheels/ctclip_monai-*.whl  this package, built from the code that ran the export
    requirements.txt           the wheel and every dependency at its exported version
    docs/README.md             what the model is, its data and metrics (from the evaluation output), the commands
    docs/metrics.json          the evaluation output the README quotes
    docs/metadata_schema.json  the schema verify_metadata checks against offline
    LICENSE

Bundle configs call :func:`export_bundle` from each stage's ``configs/export.json``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctclip_contract import (FILES_SHA256_KEY, METADATA_SCHEMA, PACKAGES_KEY, ModelConfig, atomic_path, atomic_write_text,
                             file_sha256, read_json, release)
from custom_nets import build_tokenizer

from .checkpoints import atomic_torch_save
from .metrics import macro_ece
from .writers import auroc_table_markdown, write_json
from .zeroshot import find_clip_model

__all__ = ["DIST_NAME", "build_wheel", "exported_packages", "accepted_ranges", "repository_paths", "export_network", "export_bundle", "VERIFY_EXPRESSION"]

logger = logging.getLogger(__name__)

#: this project's distribution name (setup.cfg)
DIST_NAME = "ctclip-monai"
#: the first step of an exported bundle's ``initialize``
VERIFY_EXPRESSION = "$ctclip_contract.verify_bundle(@bundle_root)"
#: the text-encoder folder inside an exported bundle, as a config expression
TEXT_ENCODER_EXPRESSION = "$os.path.join(@bundle_root, 'models', 'text_encoder')"
# a fixed timestamp makes the wheel and the zip byte-identical for identical contents
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------------------- wheel
def _zip_write(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build_wheel(dest_dir: str | os.PathLike) -> Path:
    """Write this package as a pure-Python wheel, built from the code this process imports.

    The files are the installed packages' own (``top_level.txt``: ``ctclip_contract``, ``custom_nets``, ...),
    read where Python imports them from (the source tree of an editable install, or site-packages), so the
    wheel holds exactly the code that produced the export. ``METADATA`` (name, version, dependencies) is the
    installed distribution's. Deterministic: the same code gives the same bytes.

    Returns:
        the wheel's path.
    """
    dist = importlib.metadata.distribution(DIST_NAME)
    version = dist.version
    stem = f"{DIST_NAME.replace('-', '_')}-{version}"
    entries: list[tuple[str, bytes]] = []
    top_level = (dist.read_text("top_level.txt") or "").split()
    if not top_level:
        raise RuntimeError(f"{DIST_NAME} {version}: no top_level.txt in its installed metadata; reinstall it "
                           "(pip install -e .)")
    for package in sorted(top_level):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"{DIST_NAME}: package {package!r} is listed but cannot be imported")
        root = Path(spec.origin).parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                entries.append((f"{package}/{path.relative_to(root).as_posix()}", path.read_bytes()))
    info = f"{stem}.dist-info"
    entries += [
        # an egg-info (a source tree on sys.path) names the same core metadata PKG-INFO
        (f"{info}/METADATA", (dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "").encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: ctclip-monai bundle export\nRoot-Is-Purelib: true\n"
                          b"Tag: py3-none-any\n"),
        (f"{info}/top_level.txt", ("\n".join(top_level) + "\n").encode()),
    ]
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in entries) + f"{info}/RECORD,,\n"
    entries.append((f"{info}/RECORD", record.encode()))
    dest = Path(dest_dir) / f"{stem}-py3-none-any.whl"
    with atomic_path(dest, suffix=".whl") as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for name, data in entries:
                _zip_write(zf, name, data)
    return dest


def _declared_requirements() -> dict[str, str]:
    """``{name: version specifier}`` of every core dependency this package declares (``Requires-Dist`` without an
    extra's marker), e.g. ``{"torch": ">=2.4", "monai": "<1.7,>=1.6"}``."""
    declared = {}
    for requirement in importlib.metadata.requires(DIST_NAME) or []:
        requirement, _, marker = requirement.partition(";")
        if "extra" in marker:
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$", requirement)
        if m:
            declared[m.group(1)] = m.group(3).replace(" ", "")
    return declared


def exported_packages() -> dict[str, str]:
    """``{name: installed version}`` of this package and of every core dependency it declares."""
    names = [DIST_NAME] + list(_declared_requirements())
    return {name: importlib.metadata.version(name) for name in dict.fromkeys(names)}


def accepted_ranges(packages: Mapping[str, str]) -> dict[str, str]:
    """The version range a received bundle accepts for each package: this package exactly; every other one as this
    package declares it (the versions its code works with), below the next major release after the exported one.

    Exact versions would refuse the environments a bundle must also run in (MONAI Label's, for one, needs torch and
    pydicom at other releases); ``required_packages_version`` and ``requirements.txt`` keep the exact ones.
    """
    declared = _declared_requirements()
    ranges = {}
    for name, version in packages.items():
        numbers = release(version)
        if name == DIST_NAME:
            ranges[name] = "==" + ".".join(map(str, numbers))
            continue
        spec = declared.get(name) or ">=" + ".".join(map(str, numbers))
        ranges[name] = spec if "<" in spec else f"{spec},<{numbers[0] + 1}"
    return ranges


def _public_version(version: str) -> str:
    return version.split("+")[0]


# --------------------------------------------------------------------------------------------- weights
def export_network(network: nn.Module, export_dir: str | os.PathLike, example_shape: Sequence[int],
                   torchscript: bool = True, onnx: bool | str = "auto", atol: float = 1e-5) -> dict[str, Any]:
    """Write the bundle's deployable files and check each of them against the eager network.

    - ``model.pt``: ``network.state_dict()`` (keys of ``network_def``), what MONAI Label loads into
      ``network_def`` (with ``strict=False``: a key mismatch would silently keep random weights, so the file is
      reloaded here with ``strict=True``);
    - ``model.ts``: TorchScript trace ``image -> output`` (zero-shot: with the prompt latents baked in);
    - ``model.onnx``: only when ``onnx`` and ``onnxscript`` are installed.

    Args:
        network: the weighted network (zero-shot classifier, ClassFine classifier).
        export_dir: output folder (the bundle's ``models/``).
        example_shape: ``(B, 1, D, H, W)`` example input for tracing.
        torchscript: write ``model.ts``.
        onnx: ``True``, ``False`` or ``"auto"`` (when importable).
        atol: largest accepted difference between the exported and the eager outputs.

    Returns:
        a summary (files, checks, skipped formats with reasons), also written as ``export.json``.
    """
    out = Path(export_dir)
    out.mkdir(parents=True, exist_ok=True)
    network = network.eval()
    summary: dict[str, Any] = {"files": {}, "skipped": {}, "max_abs_diff": {}}
    sd = network.state_dict()
    atomic_torch_save(sd, out / "model.pt")
    summary["files"]["model.pt"] = {"keys": len(sd), "key_prefixes": sorted({k.split(".")[0] for k in sd})}
    # reload check: the exact key set MONAI Label will meet
    reloaded = torch.load(out / "model.pt", weights_only=True)
    result = network.load_state_dict(reloaded, strict=True)
    summary["strict_reload"] = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}

    device = next(network.parameters()).device
    example = torch.randn(*example_shape, device=device).clamp(-1, 1)
    with torch.no_grad():
        expected = network(example)
        if torchscript:
            try:
                traced = torch.jit.trace(network, example, check_trace=False)
                traced.save(str(out / "model.ts"))
                got = torch.jit.load(str(out / "model.ts"), map_location=device)(example)
                diff = float((got - expected).abs().max())
                summary["max_abs_diff"]["model.ts"] = diff
                if diff > atol:
                    raise RuntimeError(f"TorchScript output differs from the eager network by {diff:.3g} > {atol}")
                summary["files"]["model.ts"] = {"input_shape": list(example_shape)}
            except Exception as e:  # noqa: BLE001 - an unsupported format is reported, not fatal
                (out / "model.ts").unlink(missing_ok=True)  # a trace that failed its check is not shipped
                summary["skipped"]["model.ts"] = f"{type(e).__name__}: {e}"
        want_onnx = onnx is True or onnx == "auto"
        if want_onnx:
            if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
                summary["skipped"]["model.onnx"] = "onnx/onnxscript not installed (pip install onnx onnxscript)"
                if onnx is True:
                    raise RuntimeError("ONNX export requested but onnx/onnxscript are not installed")
            else:
                try:
                    torch.onnx.export(network, (example,), str(out / "model.onnx"), input_names=["image"],
                                      output_names=["probabilities"])
                    summary["files"]["model.onnx"] = {"input_shape": list(example_shape)}
                except Exception as e:  # noqa: BLE001
                    summary["skipped"]["model.onnx"] = f"{type(e).__name__}: {e}"
                    if onnx is True:
                        raise
    write_json(out / "export.json", summary)
    logger.info(f"exported {sorted(summary['files'])} to {out}; skipped {summary['skipped']}")
    return summary


# --------------------------------------------------------------------------------------------- configs
def repository_paths(config: Any, where: str = "") -> list[str]:
    """Every string of a config (keys included) that names a path of this repository (``bundles/...``), as
    ``"<id>: <string>"``: what a bundle that runs outside the repository must not contain."""
    if isinstance(config, Mapping):
        found = [f"{where}#{k} (key): {k}" for k in config if "bundles/" in str(k)]
        for k, v in config.items():
            found += repository_paths(v, f"{where}#{k}")
        return found
    if isinstance(config, (list, tuple)):
        return [p for i, v in enumerate(config) for p in repository_paths(v, f"{where}#{i}")]
    return [f"{where}: {config}"] if isinstance(config, str) and "bundles/" in config else []


def _embedded_model_config(model_cfg: ModelConfig, text_encoder_saved: bool,
                           image_encoder: nn.Module | None = None) -> dict[str, Any]:
    """The model config as exported: when the text encoder was saved into the bundle, its section points there
    (architecture from ``config.json``, weights from ``model.pt``, tokenizer files beside them); an image encoder
    that loads pretrained parts (e.g. a DINOv2 backbone from the hub) gives settings that rebuild its
    architecture offline (``exportable_settings``), its weights being in ``model.pt`` too."""
    cfg = model_cfg.to_dict()
    if image_encoder is not None and hasattr(image_encoder, "exportable_settings"):
        cfg["image_encoder"] = {"type": model_cfg.image_encoder[0], **image_encoder.exportable_settings()}
    if text_encoder_saved:
        section = {k: v for k, v in cfg["text_encoder"].items()
                   if k not in ("bert_config", "from_pretrained_kwargs", "model_class", "tokenizer_extra_words")}
        section.update(pretrained=TEXT_ENCODER_EXPRESSION, tokenizer=TEXT_ENCODER_EXPRESSION,
                       load_pretrained_weights=False,
                       _doc="exported: the architecture and tokenizer from models/text_encoder (save_pretrained), "
                            "the weights from models/model.pt")
        cfg["text_encoder"] = section
    return cfg


def _export_config(config: dict[str, Any], model_config: dict[str, Any] | None, base: bool) -> dict[str, Any]:
    config = dict(config)
    if "bundle_root" in config or base:
        config["bundle_root"] = "."
    if model_config is not None and "model_config" in config:
        config["model_config"] = model_config
    if "model_overrides" in config:
        config["model_overrides"] = {}
    if base or "initialize" in config:
        steps = [s for s in config.get("initialize", []) if s != VERIFY_EXPRESSION]
        config["initialize"] = [VERIFY_EXPRESSION] + steps
    imports = list(config.get("imports", []))
    if base and "$import ctclip_contract" not in imports:
        config["imports"] = ["$import ctclip_contract"] + imports
    if base and "$import os" not in imports:
        config["imports"] = config.get("imports", []) + ["$import os"]
    return config


# --------------------------------------------------------------------------------------------- metadata
def _network_data_format(model_cfg: ModelConfig, class_names: Sequence[str], output_type: str) -> dict[str, Any]:
    contract = model_cfg.input
    channels, *spatial = contract.model_input_shape
    low, high = (contract.hu_to_model(v) for v in contract.hu_window)
    output: dict[str, Any] = {
        "type": output_type, "format": "classes", "num_channels": len(class_names), "spatial_shape": [len(class_names)],
        "dtype": "float32", "value_range": [0, 1] if output_type == "probabilities" else [],
        "is_onehot": False, "channel_def": {str(i): n for i, n in enumerate(class_names)},
    }
    return {
        "inputs": {"image": {
            "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": channels,
            "spatial_shape": list(spatial), "dtype": "float32", "value_range": [low, high], "is_patch_data": False,
            "channel_def": {"0": "image"},
        }},
        "outputs": {"pred": output},
    }


def _metadata(source_meta: dict[str, Any], packages: Mapping[str, str], files_sha256: Mapping[str, str],
              network_data_format: dict[str, Any] | None, eval_metrics: dict[str, Any], exported: dict[str, Any]):
    meta = dict(source_meta)
    own = {"torch": "pytorch_version", "monai": "monai_version", "numpy": "numpy_version"}
    for package, key in own.items():
        if package in packages:
            meta[key] = _public_version(packages[package])
    meta["required_packages_version"] = {n: _public_version(v) for n, v in packages.items() if n not in own}
    meta[PACKAGES_KEY] = accepted_ranges(packages)
    meta[FILES_SHA256_KEY] = dict(files_sha256)
    if network_data_format is not None:
        meta["network_data_format"] = network_data_format
    meta["eval_metrics"] = eval_metrics
    meta["exported"] = exported
    return meta


def _eval_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    auroc = metrics.get("auroc") or {}
    return {"macro_auroc": auroc.get("macro"), "macro_auroc_ci": [auroc.get("macro_ci_low"), auroc.get("macro_ci_high")],
            "n_cases": metrics.get("n_cases")}


def _dataset_summary(dataset_dir: str | os.PathLike | None) -> str:
    if not dataset_dir:
        return "not recorded (export without --dataset_dir)"
    datalist = Path(dataset_dir) / "datalist.json"
    if not datalist.is_file():
        return f"not recorded ({datalist} not found)"
    splits = read_json(datalist, "datalist")
    rows = [f"{name}: {len(items)} volumes of {len({i.get('patient') for i in items})} patients"
            for name, items in splits.items() if isinstance(items, list)]
    return "; ".join(rows)


# --------------------------------------------------------------------------------------------- README
def _calibration_note(metrics: Mapping[str, Any]) -> str:
    before, after = macro_ece(metrics)
    if before is None:
        return ""
    cal = metrics["calibration"]
    text = f"Macro expected calibration error ({cal.get('n_bins')} equal-width bins) on this split: {before:.3f}"
    if after is None:
        return text + " (uncalibrated probabilities).\n"
    return (text + f" uncalibrated, {after:.3f} after the {cal['calibrated'].get('method', '')} calibration fitted on "
            "validation, which `configs/inference.json` applies (`models/calibration.json`; the decisions at the "
            "validation thresholds are the same either way).\n")


def _readme(meta: dict[str, Any], bundle_name: str, wheel: str, entry_points: Sequence[str], metrics: Mapping | None,
            export_summary: Mapping[str, Any] | None, run_example: str) -> str:
    exported = meta["exported"]
    ts = (export_summary or {}).get("files", {}).get("model.ts")
    ts_note = ((export_summary or {}).get("skipped", {}).get("model.ts") or "no network in this bundle")
    torchscript = ("`models/model.ts`: TorchScript trace of `image -> output`, checked against the eager network "
                   f"(max abs difference {export_summary['max_abs_diff'].get('model.ts', float('nan')):.2g})."
                   if ts else f"No TorchScript file: {ts_note}.")
    parts = [
        f"# {meta.get('name', bundle_name)}\n",
        f"{meta.get('description', '')}\n",
        f"Exported on {exported['date']} from the `{exported['source_bundle']}` bundle {exported['source_version']} "
        f"with model config `{exported.get('model_config', 'n/a')}`, by {DIST_NAME} {exported['package_version']}.\n",
        *([f"{exported['network']}.\n"] if exported.get("network") else []),
        "## Intended use\n",
        f"{meta.get('intended_use', 'Research only. Not a medical device; not for clinical decisions.')}\n",
        "## Training data\n",
        f"{meta.get('data_source', '')}\n",
        f"Cohort of this model: {exported['dataset']}.\n",
        "## Metrics\n",
    ]
    if metrics:
        parts.append(f"From `docs/metrics.json`, the evaluation output of this model ({metrics.get('n_cases')} "
                     "cases of the test split):\n")
        parts.append(auroc_table_markdown(metrics))
        parts.append(_calibration_note(metrics))
    else:
        parts.append("No evaluation output was given at export.\n")
    install = "pip install torch==" + meta.get("pytorch_version", "") + " && pip install -r requirements.txt"
    parts += [
        "## Install\n",
        "From this folder, in a new virtual environment (install torch first, the build for your hardware, so that "
        "pip does not pull another one; e.g. `--index-url https://download.pytorch.org/whl/cu128` for CUDA):\n",
        f"```bash\n{install}\n```\n",
        f"`requirements.txt` installs `wheels/{wheel}` (the code of this model) and every dependency at the version "
        "the bundle was exported with. Nothing is downloaded at run time: the text encoder's configuration and "
        "tokenizer are in `models/text_encoder/`.\n",
        "## Run\n",
        f"```bash\n{run_example}\n```\n",
        f"Entry points in `configs/`: {', '.join(f'`{e}`' for e in entry_points)}. The configs take a folder of "
        "NIfTI files or DICOM series (`--input`) and write to `--output_dir` (default `runs/` in this folder).\n",
        "Before anything runs, `ctclip_contract.verify_bundle` checks the installed packages against "
        "`compatible_packages` and every file of `models/` against `files_sha256` in `configs/metadata.json`; a "
        "missing or changed file, a missing package or a version out of range stops the run with one line that "
        "names it. The weights are then loaded strictly: weights of another architecture are refused with the "
        "keys named.\n",
        torchscript + "\n",
        "Check the metadata and the network's input and output offline:\n",
        "```bash\npython -m monai.bundle verify_metadata --meta_file configs/metadata.json "
        "--filepath docs/metadata_schema.json\n"
        "python -m monai.bundle verify_net_in_out network_def --config_file configs/inference.json "
        "--meta_file configs/metadata.json --bundle_root .\n```\n",
        "## A bundle is code\n",
        "Its configs run Python: `_target_` values are imported and called and `$` values are evaluated, also in "
        "command-line overrides. Review a bundle you received before running it, as you would a script. The "
        "sha256 check tells a damaged or swapped weights file from the exported one; it is not a signature.\n",
        "## Licence\n",
        "The code and configs: Apache-2.0 (`LICENSE`). The weights carry the terms of the data they were trained "
        "on (CT-RATE: CC BY-NC-SA 4.0).\n",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- export
def export_bundle(source_root: str | os.PathLike, export_dir: str | os.PathLike, entry_points: Sequence[str],
                  model_cfg: ModelConfig | None = None, network: nn.Module | None = None,
                  class_names: Sequence[str] | None = None, output_type: str = "probabilities",
                  extra_files: Mapping[str, str | os.PathLike | None] | None = None,
                  metrics_file: str | os.PathLike | None = None, dataset_dir: str | os.PathLike | None = None,
                  run_example: str = "", overwrite: bool = False, make_zip: bool = True) -> dict[str, Any]:
    """Pack a stage into a self-contained bundle folder (and ``<export_dir>.zip``); see the module docstring.

    Args:
        source_root: the bundle the stage ran from (its ``configs/``, ``metadata.json`` and ``LICENSE``).
        export_dir: the new bundle's folder; written in a temporary folder beside it and renamed when complete.
        entry_points: config files of ``source_root/configs`` to ship; the first is the base (``inference.json``).
        model_cfg: the model config of the weights (embedded into the configs; None: the stage has no model).
        network: the weighted network of the base entry point's ``network_def`` (None: no weights).
        class_names: the network's output columns (for ``network_data_format``).
        output_type: ``"probabilities"`` or ``"logits"``, what the network returns.
        extra_files: ``{bundle-relative path: source file}`` copied in (prompt file, thresholds); a None source is
            skipped.
        metrics_file: the evaluation's ``metrics.json``; the README and ``eval_metrics`` quote it.
        dataset_dir: the ct_preprocess folder the model was trained on (its splits are summarised).
        run_example: the command the README shows.
        overwrite: replace an existing ``export_dir``.
        make_zip: also write ``<export_dir>.zip``.

    Returns:
        ``{"bundle": path, "zip": path or None, "files_sha256": {...}, "export": export_network's summary}``.

    Raises:
        FileExistsError: ``export_dir`` exists and ``overwrite`` is False.
        FileNotFoundError: a file of ``extra_files`` does not exist (ClassFine: no thresholds fitted yet).
        ValueError: an exported config still names a file of this repository.
    """
    if not str(export_dir or ""):
        raise ValueError("no export folder given: pass --export_dir OUT")
    missing = {rel: str(src) for rel, src in (extra_files or {}).items() if src and not Path(src).is_file()}
    if missing:
        raise FileNotFoundError("; ".join(f"{src}: not found (exported as {rel})" for rel, src in missing.items()))
    source_root, export_dir = Path(source_root), Path(export_dir)
    if export_dir.exists() and not overwrite:
        raise FileExistsError(f"export folder {export_dir} exists; choose another or pass --overwrite True")
    source_meta = read_json(source_root / "configs" / "metadata.json", "bundle metadata")
    metrics = read_json(metrics_file, "metrics file") if metrics_file else None
    packages = exported_packages()
    clip = find_clip_model(network) if network is not None else None
    if clip is not None:
        model_cfg = clip.config
    summary = None
    with atomic_path(export_dir, directory=True) as tmp:
        models = tmp / "models"
        if network is not None:
            shape = [1] + list(model_cfg.input.model_input_shape)
            summary = export_network(network, models, shape, onnx=False)
            text_dir = models / "text_encoder"
            clip.text_transformer.config.save_pretrained(text_dir)
            build_tokenizer(model_cfg).save_pretrained(str(text_dir))
        for rel, src in (extra_files or {}).items():
            if src:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / rel)
        embedded = (_embedded_model_config(model_cfg, network is not None,
                                           clip.visual_transformer if clip is not None else None)
                    if model_cfg is not None else None)
        (tmp / "configs").mkdir(exist_ok=True)
        for i, name in enumerate(entry_points):
            config = _export_config(read_json(source_root / "configs" / name, "bundle config"), embedded, base=i == 0)
            repo_paths = repository_paths(config)
            if repo_paths:
                raise ValueError(f"{source_root / 'configs' / name}: still names files of the repository: {repo_paths}")
            write_json(tmp / "configs" / name, config)
        if (source_root / "configs" / "logging.conf").is_file():
            shutil.copyfile(source_root / "configs" / "logging.conf", tmp / "configs" / "logging.conf")
        wheel = build_wheel(tmp / "wheels")
        requirements = [f"./wheels/{wheel.name}"] + [f"{n}=={_public_version(v)}" for n, v in packages.items()
                                                      if n != DIST_NAME] + ["jsonschema>=4  # verify_metadata only"]
        atomic_write_text(tmp / "requirements.txt", "\n".join(requirements) + "\n")
        files_sha256 = {p.relative_to(tmp).as_posix(): file_sha256(p)
                        for p in sorted(models.rglob("*")) if p.is_file()} if models.is_dir() else {}
        exported = {"date": datetime.date.today().isoformat(), "source_bundle": source_root.resolve().name,
                    "source_version": source_meta.get("version"), "package_version": packages[DIST_NAME],
                    "model_config": model_cfg.get("name") if model_cfg is not None else None,
                    "dataset": _dataset_summary(dataset_dir), "wheel": wheel.name}
        if callable(getattr(network, "describe", None)):  # what the weights are when a config option chose it
            exported["network"] = network.describe()
        ndf = _network_data_format(model_cfg, class_names, output_type) if network is not None and class_names else None
        meta = _metadata(source_meta, packages, files_sha256, ndf, _eval_metrics(metrics), exported)
        write_json(tmp / "configs" / "metadata.json", meta)
        (tmp / "docs").mkdir(exist_ok=True)
        shutil.copyfile(METADATA_SCHEMA, tmp / "docs" / "metadata_schema.json")
        if metrics is not None:
            write_json(tmp / "docs" / "metrics.json", metrics)
        atomic_write_text(tmp / "docs" / "README.md",
                          _readme(meta, export_dir.name, wheel.name, entry_points, metrics, summary, run_example))
        if (source_root / "LICENSE").is_file():
            shutil.copyfile(source_root / "LICENSE", tmp / "LICENSE")
    archive = None
    if make_zip:
        archive = export_dir.with_name(export_dir.name + ".zip")
        with atomic_path(archive, suffix=".zip") as tmp_zip:
            with zipfile.ZipFile(tmp_zip, "w") as zf:
                for path in sorted(export_dir.rglob("*")):
                    if path.is_file():
                        _zip_write(zf, f"{export_dir.name}/{path.relative_to(export_dir).as_posix()}",
                                   path.read_bytes())
    logger.info(f"exported bundle {export_dir} ({len(files_sha256)} model files){' and ' + str(archive) if archive else ''}")
    return {"bundle": str(export_dir), "zip": str(archive) if archive else None, "files_sha256": files_sha256,
            "export": summary}
