"""The main job: the synthetic demo cohort through every stage, each one a MONAI bundle run.

``python -m workflows.demo --output_dir demo_output`` (what ``make demo`` runs) does

1. ``bundles/synthetic_chest_ct``  generate the demo cohort (CT-RATE layout, NIfTI + DICOM)
2. ``bundles/ct_preprocess``       RAS / HU / spacing / crop-pad at the ``ctclip_small`` contract
3. ``bundles/ct_clip_pretrain``    contrastive pretraining with zero-shot validation every epoch
4. ``bundles/ct_clip_classfine``   ClassFine training, then evaluation on held-out test patients
5. ``bundles/ct_clip_zeroshot``    zero-shot evaluation and retrieval with the pretrained model
6. ``configs/export.json``         the zero-shot and ClassFine models exported as self-contained bundles into
                                   ``<output_dir>/bundles/`` (docs/sharing_bundles.md)

and then prints a summary table and writes ``<output_dir>/report.md`` with the tables and pictures.
Each stage runs in its own process through ``python -m monai.bundle run`` (exactly the command a
user would type; the commands are in the report), logs to ``<output_dir>/logs/<stage>.log``, and
leaves a marker when it finished, so running the demo again resumes after the last finished stage. The marker
records the stage's command: a folder whose finished stages ran with other options (another ``--num_cases``, say)
is refused instead of being resumed with stale results.

``--scale large`` (``make demo DEMO_SCALE=large``) runs the same stages on a cohort three times the size
(:data:`DEMO_SCALES`), in its own default folder.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import fire
import torch

from ctclip_contract import install_bundle_excepthook, load_model_config
from ctclip_contract.anatomy import LABEL_TABLE_FILE
from custom_nets import reads_segmentation
from custom_nets.image_encoders import build_image_encoder

from .metrics import macro_ece

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The demo's sizes: ``default`` fits 15 minutes of stages on 2 CPU cores; ``large`` trades time for training pairs,
#: which zero-shot accuracy grows with (docs/experiments.md, "More training pairs").
DEMO_SCALES = {"default": {"num_cases": 900}, "large": {"num_cases": 2700}}


@dataclass
class Stage:
    """One bundle run of the demo.

    Args:
        name: short stage name (log file and marker name).
        bundle: the bundle's folder, relative to the repository root (``bundles/<name>``); passed as
            ``--bundle_root``, so every default path of the bundle derives from it.
        config_files: config file names in the bundle's ``configs/`` folder, merged in order.
        overrides: ``--key value`` overrides.
        title: what the stage does, for the console and the report.
    """

    name: str
    bundle: str
    config_files: Sequence[str]
    overrides: dict[str, Any]
    title: str
    seconds: float | None = field(default=None)

    def command(self) -> list[str]:
        files = [f"{self.bundle}/configs/{f}" for f in self.config_files]
        config_arg = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_arg, "--bundle_root", self.bundle]
        for key, value in self.overrides.items():
            # fire (MONAI's command line) reads Python literals: True/False, not JSON's true/false (a string)
            text = value if isinstance(value, str) else str(value) if isinstance(value, bool) else json.dumps(value)
            cmd += [f"--{key}", text]
        return cmd

    def shell_command(self) -> str:
        """The command as a user would type it from the repository root."""
        def quote(arg: str) -> str:
            # a config list reads best the way MONAI's docs write it: "['a.json','b.json']"
            return f'"{arg}"' if arg.startswith("[") and '"' not in arg else shlex.quote(arg)

        return " ".join(["python"] + [quote(c) for c in self.command()[1:]])


def multilevel_alignment_applies(model_config: str) -> bool:
    """Whether a model config can pretrain with the multi-level alignment (the pretraining bundle's
    ``configs/multilevel.json``): its image encoder reads anatomical masks (built on the meta device where it can
    be: no weights, no memory) and its reports come as sentences (``text.pooling`` ``"sentence_mean"``)."""
    config = load_model_config(model_config)
    if config.text.sentence_rows is None:
        return False
    try:
        with torch.device("meta"):
            return reads_segmentation(build_image_encoder(config))
    except (RuntimeError, NotImplementedError):  # an encoder that computes while it is built (CTViT): on the CPU
        return reads_segmentation(build_image_encoder(config))


def demo_reads_masks(compare_model_config: Optional[str]) -> bool:
    """Whether a stage of the demo reads the cohort's anatomical and finding masks: only the comparison model's
    multi-level pretraining and evaluation do. Without them the cohort is written without masks (about 50 s less
    of generation on 2 cores)."""
    return bool(compare_model_config) and multilevel_alignment_applies(compare_model_config)


def demo_stages(out: Path, num_cases: int, seed: int, model_config: str, pretrain_epochs: int,
                classfine_epochs: int, num_workers: int, balanced: float | bool,
                two_recon_fraction: float, compare_model_config: Optional[str] = None,
                pretrain_preset: Optional[str] = None, masks: Optional[bool] = None,
                classfine_head_input: str = "embedding") -> list[Stage]:
    """The demo pipeline as a list of bundle runs (paths relative to ``out``; arguments as :func:`main`)."""
    if masks is None:
        masks = demo_reads_masks(compare_model_config)
    cohort, pre = out / "cohort", out / "preprocessed"
    pretrain, classfine, zeroshot = out / "pretrain", out / "classfine", out / "zeroshot"
    pretrained = pretrain / "models" / "model.pt"
    bundles = out / "bundles"
    export_options = {"overwrite": True, "make_zip": False}  # a rerun replaces them; no second copy as a .zip
    common = {"dataset_dir": str(pre), "model_config": model_config}
    cohort_options = {"two_recon_fraction": two_recon_fraction, "anatomy_masks": masks, "finding_masks": masks}
    if balanced not in (False, None):
        cohort_options["balanced"] = 0.4 if balanced is True else float(balanced)  # the generator's True
    b = "bundles"
    stages = [
        Stage("generate", f"{b}/synthetic_chest_ct", ["generate.json"],
              {"output_dir": str(cohort), "num_cases": num_cases, "seed": seed, "num_workers": num_workers,
               **cohort_options},
              "Generate the synthetic chest-CT cohort (CT-RATE layout, NIfTI and DICOM)"),
        Stage("preprocess", f"{b}/ct_preprocess", ["preprocess.json"],
              {"input": str(cohort), "output_dir": str(pre), "model_config": model_config,
               "num_workers": num_workers},
              "Preprocess: RAS, HU with provenance, spacing, crop/pad, QC, patient-wise splits"),
        Stage("pretrain", f"{b}/ct_clip_pretrain",
              ["train.json"] + ([f"patch_ib_{pretrain_preset.upper()}.json"] if pretrain_preset else []),
              {**common, "output_dir": str(pretrain), "epochs": pretrain_epochs},
              "Contrastive pretraining (CT-CLIP loss) with zero-shot validation per epoch"),
        Stage("classfine_train", f"{b}/ct_clip_classfine", ["train.json"],
              {**common, "output_dir": str(classfine), "pretrained": str(pretrained), "epochs": classfine_epochs,
               "head_input": classfine_head_input},
              f"ClassFine: 18-label head on the pretrained image encoder's {classfine_head_input}"),
        # the zero-shot figures come from the zero-shot stage: ClassFine's own zero-shot baseline would be a
        # second evaluation of the same model on the same volumes
        Stage("classfine_evaluate", f"{b}/ct_clip_classfine", ["train.json", "evaluate.json"],
              {**common, "output_dir": str(classfine), "pretrained": str(pretrained), "skip_zeroshot": True},
              "ClassFine evaluation on validation and held-out test patients"),
        Stage("zeroshot_evaluate", f"{b}/ct_clip_zeroshot", ["inference.json", "evaluate.json"],
              {**common, "output_dir": str(zeroshot), "pretrained": str(pretrained)},
              "Zero-shot classification of the 18 findings (prompt pairs, no training)"),
        Stage("zeroshot_retrieval", f"{b}/ct_clip_zeroshot", ["inference.json", "retrieval.json"],
              {**common, "output_dir": str(zeroshot), "pretrained": str(pretrained)},
              "Report-to-volume and volume-to-report retrieval, latent map"),
        Stage("zeroshot_export", f"{b}/ct_clip_zeroshot", ["inference.json", "export.json"],
              {**common, "pretrained": str(pretrained), "metrics_file": str(zeroshot / "eval" / "test" / "metrics.json"),
               "calibration_path": str(zeroshot / "eval" / "calibration.json"),
               "export_dir": str(bundles / f"ct_clip_zeroshot_{model_config}"), **export_options},
              "Export the zero-shot model as a bundle another group runs outside this repository"),
        Stage("classfine_export", f"{b}/ct_clip_classfine", ["inference.json", "export.json"],
              {**common, "ckpt_path": str(classfine / "models" / "model.pt"),
               "metrics_file": str(classfine / "eval" / "test" / "metrics.json"),
               "export_dir": str(bundles / f"ct_clip_classfine_{model_config}"), **export_options},
              "Export the ClassFine model as a bundle another group runs outside this repository"),
    ]
    if compare_model_config:
        # a second image encoder on the same preprocessed volumes, pretrained and evaluated the same way
        second = out / "compare" / compare_model_config
        options = {**common, "model_config": compare_model_config}
        # an encoder that reads anatomical masks pretrains with the multi-level alignment on (#23)
        multilevel = multilevel_alignment_applies(compare_model_config)
        stages += [
            Stage(f"pretrain_{compare_model_config}", f"{b}/ct_clip_pretrain",
                  ["train.json"] + (["multilevel.json"] if multilevel else []),
                  {**options, "output_dir": str(second / "pretrain"), "epochs": pretrain_epochs},
                  f"Contrastive pretraining of the second model, {compare_model_config}"
                  + (" (global, region and sentence alignment, patch segmentation)" if multilevel else "")),
            Stage(f"zeroshot_evaluate_{compare_model_config}", f"{b}/ct_clip_zeroshot",
                  ["inference.json", "evaluate.json"],
                  {**options, "output_dir": str(second / "zeroshot"),
                   "pretrained": str(second / "pretrain" / "models" / "model.pt")},
                  f"Zero-shot classification with the second model, {compare_model_config}"),
        ]
        if multilevel:  # what the region and sentence levels learned, on the same test volumes
            stages.append(Stage(
                f"multilevel_evaluate_{compare_model_config}", f"{b}/ct_clip_zeroshot",
                ["inference.json", "multilevel_eval.json"],
                {**options, "output_dir": str(second / "zeroshot"),
                 "pretrained": str(second / "pretrain" / "models" / "model.pt"),
                 "heads_path": str(second / "pretrain" / "models" / "heads.pt")},
                f"Region alignment and localisation (pointing game) of the second model, {compare_model_config}"))
    return stages


def _fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def run_stage(stage: Stage, out: Path, heartbeat_s: float = 20.0, echo: Callable[[str], None] = print) -> None:
    """Run one stage in its own process, logging to ``out/logs/<name>.log``.

    A heartbeat line with the elapsed time and the stage's latest log line keeps the console alive
    without flooding it. On failure the log's tail is shown and ``RuntimeError`` names the log.
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{stage.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.time()
    last_line = [""]
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {stage.shell_command()}\n")
        log.flush()
        proc = subprocess.Popen(stage.command(), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.strip().split("\r")[-1].strip()
                if text:
                    last_line[0] = text

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(timeout=heartbeat_s)
            if reader.is_alive():
                echo(f"    [{stage.name} {_fmt_seconds(time.time() - start)}] {last_line[0][:110]}")
        code = proc.wait()
    stage.seconds = time.time() - start
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        echo("\n".join("    | " + t for t in tail))
        raise RuntimeError(f"stage {stage.name!r} failed with exit code {code}; full log: {log_path}")


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _macro(metrics: Any) -> dict[str, Any]:
    """Macro AUROC (+ CI) and the threshold protocols' macro F1 from a ``metrics.json``."""
    if not isinstance(metrics, dict):
        return {}
    auroc = metrics.get("auroc", {})
    row = {"auroc": auroc.get("macro"), "ci_low": auroc.get("macro_ci_low"), "ci_high": auroc.get("macro_ci_high")}
    for name, proto in (metrics.get("protocols") or {}).items():
        macro = proto.get("macro", {}) if isinstance(proto, dict) else {}
        row[f"{name}_f1"] = macro.get("f1")
    row["ece"], row["ece_calibrated"] = macro_ece(metrics)
    return row


def collect_results(out: Path) -> dict[str, Any]:
    """Gather the numbers the stages wrote (missing files give missing entries, never made-up ones)."""
    results: dict[str, Any] = {}
    qc = out / "preprocessed" / "qc.csv"
    if qc.is_file():
        with open(qc, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        results["qc"] = {"inputs": len(rows), "ok": sum(r.get("status") == "ok" for r in rows)}
    datalist = _load_json(out / "preprocessed" / "datalist.json")
    if isinstance(datalist, dict):
        results["splits"] = {
            k: {"volumes": len(v), "patients": len({i.get("patient") for i in v})} for k, v in datalist.items()
        }
    curve = _load_json(out / "pretrain" / "eval" / "metrics_per_epoch.json")
    if isinstance(curve, list):
        results["pretrain_curve"] = curve
    for key, path in (("classfine_test", out / "classfine" / "eval" / "test" / "metrics.json"),
                      ("zeroshot_test", out / "zeroshot" / "eval" / "test" / "metrics.json")):
        metrics = _load_json(path)
        if metrics is not None:
            results[key] = metrics
    for path in sorted(out.glob("compare/*/zeroshot/eval/test/metrics.json")):
        metrics = _load_json(path)
        if metrics is not None:
            results.setdefault("compare_zeroshot_test", {})[path.parents[3].name] = metrics
    for path in sorted(out.glob("compare/*/zeroshot/eval/multilevel/metrics.json")):
        metrics = _load_json(path)
        if metrics is not None:
            results.setdefault("compare_multilevel_test", {})[path.parents[3].name] = metrics
    retrieval = _load_json(out / "zeroshot" / "retrieval" / "metrics.json")
    if retrieval is not None:
        results["retrieval"] = retrieval
    return results


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def _multilevel_cells(metrics: Any) -> tuple[str, str]:
    """Region alignment accuracy and pointing-game hit rate (macro), each with its CI, count and chance level."""
    if not isinstance(metrics, dict):
        return "–", "–"
    region, loc = metrics.get("region_alignment") or {}, metrics.get("localisation") or {}
    return (f"{_num(region.get('accuracy'))} [{_num(region.get('ci_low'))}, {_num(region.get('ci_high'))}] "
            f"(chance {_num(region.get('chance'))}, {region.get('n_sentences', 0)} sentences)",
            f"{_num(loc.get('hit_rate_macro'))} [{_num(loc.get('ci_low'))}, {_num(loc.get('ci_high'))}] "
            f"(chance {_num(loc.get('chance_macro'))}, {loc.get('n_findings', 0)} findings)")


def summary_table(results: dict[str, Any]) -> str:
    """Markdown table: ClassFine against zero-shot on held-out test patients, every protocol; a comparison model
    pretrained with the multi-level alignment adds its region alignment accuracy and pointing-game hit rate."""
    multilevel = results.get("compare_multilevel_test", {})
    extra = " region alignment accuracy [95% CI]*** | pointing game [95% CI]*** |" if multilevel else ""
    lines = ["| model (test patients) | macro AUROC [95% CI] | macro ECE before → after calibration** | F1 val-Youden "
             "| F1 VLM3D (0.5) | F1 CT-CLIP paper* |" + extra, "|---|---|---|---|---|---|" + "---|---|" * bool(extra)]
    rows = [("ClassFine", results.get("classfine_test"), None), ("Zero-shot", results.get("zeroshot_test"), None)]
    rows += [(f"Zero-shot, {name}", metrics, multilevel.get(name))
             for name, metrics in results.get("compare_zeroshot_test", {}).items()]
    for label, metrics, levels in rows:
        m = _macro(metrics)
        if not m:
            continue
        cells = " {} | {} |".format(*_multilevel_cells(levels)) if extra else ""
        lines.append(f"| {label} | {_num(m.get('auroc'))} [{_num(m.get('ci_low'))}, {_num(m.get('ci_high'))}] | "
                     f"{_num(m.get('ece'))} → {_num(m.get('ece_calibrated'))} | "
                     f"{_num(m.get('val_youden_f1'))} | {_num(m.get('vlm3d_f1'))} | {_num(m.get('ctclip_paper_f1'))} |"
                     + cells)
    lines.append("")
    lines.append("*CT-CLIP paper protocol: thresholds tuned on the evaluated set itself and support-weighted F1 "
                 "(optimistic; shown only for comparison with published numbers).")
    lines += ["", "**Expected calibration error (10 equal-width bins, mean over the findings) of the probabilities "
                 "as the model gives them → after the per-finding calibration fitted on validation (the probabilities "
                 "inference writes); the AUROC and the val-Youden decisions are the same for both."]
    if extra:
        lines += ["", "***Multi-level alignment (#23), on the same test volumes with their masks: region alignment "
                      "accuracy = share of the report sentences naming one anatomical region whose own region's "
                      "embedding ranks first among the regions in the volume's mask (chance: 1 / regions present); "
                      "pointing game = share of positive findings whose prompt's attention peaks on a patch holding "
                      "a voxel of the finding's mask, macro over the findings (chance: the share of patches holding "
                      "one). CIs: percentile bootstrap over volumes. Only models pretrained with the three levels "
                      "have them (–: not applicable)."]
    return "\n".join(lines)


def per_class_table(results: dict[str, Any]) -> str:
    """Per-pathology AUROC, ClassFine next to zero-shot."""
    cf = (results.get("classfine_test") or {}).get("auroc", {}).get("per_class", {})
    zs = (results.get("zeroshot_test") or {}).get("auroc", {}).get("per_class", {})
    names = list(cf) or list(zs)
    if not names:
        return ""
    def value(table, n):
        entry = table.get(n)
        return entry.get("auroc") if isinstance(entry, dict) else entry

    lines = ["| pathology | ClassFine AUROC | zero-shot AUROC |", "|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {_num(value(cf, n))} | {_num(value(zs, n))} |")
    return "\n".join(lines)


def retrieval_table(results: dict[str, Any]) -> str:
    """Recall@k and MRR in both directions, each next to its random baseline."""
    r = results.get("retrieval")
    if not isinstance(r, dict):
        return ""
    ks = (1, 5, 10, 50)
    rows = ["| direction | " + " | ".join(f"R@{k}" for k in ks) + " | MRR |", "|---|" + "---|" * (len(ks) + 1)]
    for direction in ("report_to_volume", "volume_to_report"):
        d = r.get(direction) or {}
        if d:
            name = direction.replace("_", " ")
            rows.append(f"| {name} | " + " | ".join(_num(d.get(f"recall@{k}")) for k in ks) + f" | {_num(d.get('mrr'))} |")
            rows.append(f"| {name}, random | " + " | ".join(_num(d.get(f"random_recall@{k}")) for k in ks)
                        + f" | {_num(d.get('random_mrr'))} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def write_report(out: Path, results: dict[str, Any], stages: Sequence[Stage]) -> Path:
    """``out/report.md``: what ran, how long it took, the tables, and the pictures."""
    lines = ["# Demo report: synthetic chest-CT cohort through every stage", "",
             "All numbers below come from this run's files; the data is synthetic (procedural phantom), so they "
             "show that the pipeline works, not how a model does on patients.", ""]
    if "splits" in results:
        lines += ["## Data", "", "| split | volumes | patients |", "|---|---|---|"]
        lines += [f"| {k} | {v['volumes']} | {v['patients']} |" for k, v in results["splits"].items()]
        if "qc" in results:
            lines += ["", f"Preprocessing QC: {results['qc']['ok']} of {results['qc']['inputs']} inputs ok "
                          "(see `preprocessed/qc.csv`)."]
        lines.append("")
    lines += ["## Results on held-out test patients", "", summary_table(results), ""]
    pc = per_class_table(results)
    if pc:
        lines += ["### Per pathology", "", pc, ""]
    rt = retrieval_table(results)
    if rt:
        lines += ["## Retrieval (test split)", "", rt, ""]
    curve = results.get("pretrain_curve")
    if curve:
        lines += ["## Pretraining: validation zero-shot macro AUROC per epoch", "",
                  "| epoch | " + " | ".join(str(r.get("epoch")) for r in curve) + " |",
                  "|---|" + "---|" * len(curve),
                  "| AUROC | " + " | ".join(_num(r.get("macro_auroc")) for r in curve) + " |", ""]
    pictures = [("Example cases (findings marked)", "figures/example_cases.png"),
                ("Pretraining learning curve", "pretrain/eval/learning_curve.png"),
                ("ClassFine ROC curves (test)", "classfine/eval/test/roc_curves.png"),
                ("Zero-shot ROC curves (test)", "zeroshot/eval/test/roc_curves.png"),
                ("ClassFine reliability diagram (test)", "classfine/eval/test/reliability.png"),
                ("Zero-shot reliability diagram (test)", "zeroshot/eval/test/reliability.png"),
                ("Image latents (2-D map)", "zeroshot/retrieval/latent_map.png")]
    for name, metrics in results.get("compare_multilevel_test", {}).items():
        folder = f"compare/{name}/zeroshot/eval/multilevel"
        pictures += [(f"{name}: where a finding's prompt looks ({f.split('_attention')[0]})", f"{folder}/{f}")
                     for f in (metrics.get("figures") or [])]
    shown = [(t, p) for t, p in pictures if (out / p).is_file()]
    if shown:
        lines += ["## Pictures", ""] + [f"### {t}\n\n![{t}]({p})\n" for t, p in shown]
    exported = sorted(p for p in (out / "bundles").glob("*") if p.is_dir()) if (out / "bundles").is_dir() else []
    if exported:
        lines += ["## Bundles to share", "",
                  "Self-contained MONAI bundles that another group installs and runs outside this repository, "
                  "offline; each one's `docs/README.md` says how (`--make_zip True` in the export also packs each "
                  "into one `.zip`):", ""]
        lines += [f"- `bundles/{p.name}`" for p in exported] + [""]
    lines += ["## Stages and commands", "", "| stage | time | command |", "|---|---|---|"]
    for s in stages:
        lines.append(f"| {s.title} | {_fmt_seconds(s.seconds) if s.seconds is not None else 'resumed'} | "
                     f"`{s.shell_command()}` |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(output_dir: Optional[str] = None, num_cases: Optional[int] = None, seed: int = 0, model_config: str = "ctclip_small",
         pretrain_epochs: int = 8, classfine_epochs: int = 8, num_workers: int = 2, balanced: float | bool = 0.4,
         two_recon_fraction: float = 0.0, compare_model_config: Optional[str] = None, force: bool = False,
         pretrain_preset: Optional[str] = None, masks: Optional[bool] = None,
         classfine_head_input: str = "embedding", scale: str = "default") -> dict:
    """Run the demo end to end and print the summary.

    Args:
        output_dir: everything goes here (cohort, preprocessed data, models, evaluations, report.md). Default:
            ``demo_output`` (``demo_output_<scale>`` for another scale).
        num_cases: synthetic scans to generate (default: the scale's). Zero-shot accuracy is limited by the number
            of training pairs: on one 91-volume validation split, 207 training volumes gave a macro AUROC of 0.644
            and 414 gave 0.686.
        seed: cohort seed (the same seed gives the same cohort and splits).
        model_config: architecture config for every model stage.
        pretrain_epochs: contrastive pretraining epochs (8 x ~630 volumes: about 5 minutes on 2 CPU cores).
        classfine_epochs: ClassFine epochs.
        num_workers: worker processes for generation and preprocessing.
        balanced: per-finding probability of the cohort (False: CT-RATE prevalences). At CT-RATE prevalences a
            ~45-volume validation split holds 2-5 positive volumes of a third of the findings, too few for an
            AUROC to mean anything; 0.4 gives ~20 each.
        two_recon_fraction: share of scans written with a second reconstruction (CT-RATE has ~2 per scan). The
            demo spends its training time on distinct patients instead.
        compare_model_config: a second model config on the same input contract (e.g. ``slicefusion_small``, the
            slice-fusion encoder): it is pretrained and evaluated zero-shot like the first, and its test macro
            AUROC is printed beside the first's.
        force: rerun stages that already finished.
        pretrain_preset: a Patch-IB ablation preset, ``A``-``E`` (docs/patch_ib.md): the pretraining bundle's
            ``configs/patch_ib_<preset>.json`` is merged over ``train.json``.
        masks: write the cohort's anatomical label maps and finding masks (None: when a stage reads them,
            :func:`demo_reads_masks`). A demo output whose cohort has none is generated again (the same volumes)
            when a later run needs them.
        classfine_head_input: what the ClassFine head reads: ``"embedding"`` (the encoder's global embedding,
            standardised; test macro AUROC 0.766 against 0.722 on the demo) or ``"latent"`` (the reference
            ClassFine, the bundle's default: the contrastive latent).
        scale: ``"default"`` (900 scans, about 15 minutes of stages on 2 CPU cores) or ``"large"`` (2700 scans),
            :data:`DEMO_SCALES`.
    """
    if scale not in DEMO_SCALES:
        raise ValueError(f"scale must be one of {sorted(DEMO_SCALES)}, got {scale!r}")
    if num_cases is None:
        num_cases = DEMO_SCALES[scale]["num_cases"]
    if output_dir is None:
        output_dir = "demo_output" if scale == "default" else f"demo_output_{scale}"
    out = (REPO_ROOT / output_dir).resolve() if not os.path.isabs(output_dir) else Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = out / ".done"
    done.mkdir(exist_ok=True)
    if masks is None:  # a stage reads them, or the folder's finished cohort has them (they stay)
        masks = demo_reads_masks(compare_model_config) or (
            (done / "generate").exists() and (out / "cohort" / LABEL_TABLE_FILE).exists())
    stages = demo_stages(out, num_cases, seed, model_config, pretrain_epochs, classfine_epochs, num_workers,
                         balanced, two_recon_fraction, compare_model_config, pretrain_preset, masks,
                         classfine_head_input)
    if masks and (done / "generate").exists() and not (out / "cohort" / LABEL_TABLE_FILE).exists():
        print("The cohort was generated without masks, which this run reads: generating it again (the same volumes) "
              "and preprocessing the masks")
        for name in ("generate", "preprocess"):
            (done / name).unlink(missing_ok=True)
    check_finished_stages(out, stages, force)
    start = time.time()
    print(f"Demo: {num_cases} synthetic scans, model {model_config}, output in {out}")
    for i, stage in enumerate(stages, 1):
        marker = done / stage.name
        if marker.exists() and not force:
            print(f"[{i}/{len(stages)}] {stage.title}: already done, skipped")
            continue
        print(f"[{i}/{len(stages)}] {stage.title}\n    $ {stage.shell_command()}")
        run_stage(stage, out)
        marker.write_text(json.dumps({"seconds": stage.seconds, "command": stage.shell_command()}),
                          encoding="utf-8")
        print(f"    done in {_fmt_seconds(stage.seconds)}")
        if stage.name == "generate":
            _example_picture(out)
    results = collect_results(out)
    report = write_report(out, results, stages)
    print()
    print(summary_table(results))
    rt = retrieval_table(results)
    if rt:
        print()
        print(rt)
    print(f"\nTotal {_fmt_seconds(time.time() - start)}. Report: {report}")
    return results


def check_finished_stages(out: Path, stages: Sequence[Stage], force: bool = False) -> None:
    """Refuse to resume a demo folder whose finished stages ran with other options.

    A stage is skipped when its marker exists, so a folder made with, say, ``--num_cases 900`` would otherwise be
    "resumed" by a ``--num_cases 2700`` run with the old cohort, or a pretraining stage would resume the old
    run's finished checkpoint. Markers written before the command was recorded are trusted.

    Raises:
        ValueError: a finished stage's recorded command differs from this run's (not with ``force``, which
            runs every stage again).
    """
    if force:
        return
    for stage in stages:
        marker = out / ".done" / stage.name
        if not marker.exists():
            continue
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8") or "{}").get("command")
        except (json.JSONDecodeError, AttributeError):
            recorded = None
        if recorded is not None and recorded != stage.shell_command():
            raise ValueError(
                f"{out}: its finished stage {stage.name!r} ran with other options (was: {recorded}; now: "
                f"{stage.shell_command()}); give another --output_dir (make demo DEMO_DIR=...) or remove the folder")


def _example_picture(out: Path) -> None:
    """Axial and coronal views of a few generated cases with their findings marked."""
    try:
        subprocess.run([sys.executable, "-m", "chest_phantom.preview", "--cohort", str(out / "cohort"),
                        "--output", str(out / "figures" / "example_cases.png"), "--num_cases", "4"],
                       cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as e:  # a missing picture must not cost the run
        print(f"    (example picture skipped: {getattr(e, 'stderr', '') or e})")


@functools.wraps(main)  # main's signature and docstring, so that ``--help`` lists the options
def cli(*args, **kwargs) -> None:
    """Command line entry: like :func:`main`, without echoing the results dict (fire prints return values)."""
    main(*args, **kwargs)


if __name__ == "__main__":  # pragma: no cover
    install_bundle_excepthook(force=True)  # an error of the demo's own (a refused folder, a failed stage): one line
    fire.Fire(cli)
