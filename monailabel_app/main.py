"""MONAI Label app: serve exported zero-shot and ClassFine bundles as classification models to 3D Slicer or OHIF,
and fine-tune the ClassFine head from the labels a radiologist confirms.

    monailabel start_server --app monailabel_app --studies STUDIES \\
        --conf models ctclip_zeroshot,ctclip_classfine --conf bundles BUNDLES --host 127.0.0.1

``BUNDLES/<model>/`` is a bundle written by a stage's ``configs/export.json`` (default ``<app>/model``). Each model is
served by :class:`workflows.served_bundle.ServedBundle`, which runs the bundle's own ``inference.json``; README.md
says why MONAI Label's generic ``BundleInferTask`` is not used, lists the endpoints and shows a response.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask

from ctclip_contract import BundleError
from ctclip_contract.errors import summary_line
from workflows.served_bundle import ServedBundle, read_confirmed_labels

logger = logging.getLogger(__name__)


class BundleModel:
    """One served bundle, loaded on first use so that a broken bundle answers each request with its reason instead
    of stopping the server; reloaded when its prompt file changes (a class added by editing it)."""

    def __init__(self, root: Path, finetuned: Path):
        self.root, self.finetuned = root, finetuned
        self._served: Optional[ServedBundle] = None
        self._prompts_mtime: Optional[int] = None
        self._lock = threading.Lock()

    def _prompt_file_mtime(self) -> Optional[int]:
        path = self.root / "configs" / "prompts.json"
        return path.stat().st_mtime_ns if path.is_file() else None

    def get(self) -> ServedBundle:
        """The loaded bundle. Raises HTTPException 409 (the bundle on the server is broken) with the reason."""
        with self._lock:
            mtime = self._prompt_file_mtime()
            if self._served is None or mtime != self._prompts_mtime:
                try:
                    self._served = ServedBundle(self.root, weights=self.finetuned)
                except (BundleError, ValueError, RuntimeError, OSError) as err:
                    self._served = None
                    raise HTTPException(status_code=409, detail=f"model bundle {self.root.name} cannot be served: "
                                                                f"{summary_line(err)}") from err
                self._prompts_mtime = mtime
            return self._served

    def class_names(self) -> list:
        try:
            return self.get().class_names
        except HTTPException:
            return []


class ClassificationTask(InferTask):
    """``POST /infer/<model>``: per-class probabilities (and decisions at the bundle's thresholds) as JSON."""

    def __init__(self, model: BundleModel, description: str):
        super().__init__(type=InferType.CLASSIFICATION, labels=None, dimension=3, description=description)
        self.model = model

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["labels"] = self.model.class_names()  # the prompt file as it is now
        return info

    def is_valid(self) -> bool:
        return True

    def __call__(self, request) -> Tuple[None, Dict]:
        served = self.model.get()
        scan = request["image"]
        try:
            return None, served.predict(scan)
        except HTTPException:
            raise
        except Exception as err:  # noqa: BLE001 - a scan the bundle refuses is the client's input, not a server fault
            raise HTTPException(status_code=422, detail=f"{Path(scan).name}: {summary_line(err)}") from err


class HeadTrainTask(TrainTask):
    """``POST /train/<model>``: ClassFine's head fitted to the confirmed labels (tag ``final``), encoder frozen."""

    def __init__(self, model: BundleModel, epochs: int = 100, lr: float = 1e-2):
        super().__init__("Fine-tune the ClassFine head on the confirmed labels (encoder frozen)")
        self.model, self.epochs, self.lr = model, epochs, lr

    def config(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr}

    def __call__(self, request, datastore: Datastore):
        served = self.model.get()
        cases = []
        for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
            label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            if label.endswith(".json"):
                cases.append((datastore.get_image_uri(image_id), read_confirmed_labels(label, served.class_names)))
        summary = served.fine_tune_head(cases, self.model.finetuned, epochs=int(request.get("epochs", self.epochs)),
                                        lr=float(request.get("lr", self.lr)))
        logger.info(f"fine-tuned {self.model.root.name}: {summary}")
        return summary


class CTCLIPApp(MONAILabelApp):
    """Serves the exported bundles named by ``--conf models`` from ``--conf bundles``."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        bundles = Path(conf.get("bundles") or os.path.join(app_dir, "model"))
        names = [n.strip() for n in conf.get("models", "").split(",") if n.strip()]
        if not names:
            raise ValueError("name the models to serve: --conf models ctclip_zeroshot,ctclip_classfine")
        missing = [n for n in names if not (bundles / n / "configs" / "inference.json").is_file()]
        if missing:
            raise ValueError(f"no exported bundle for {missing} in {bundles} (each model is a folder written by a "
                             "stage's configs/export.json)")
        finetuned = Path(conf.get("finetuned_dir") or os.path.join(app_dir, "finetuned"))
        self.models = {n: BundleModel(bundles / n, finetuned / n / "model.pt") for n in names}
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="ctclip-monai",
                         description="CT-CLIP zero-shot and ClassFine chest-CT abnormality classification",
                         version="0.1.0")

    def init_infers(self) -> Dict[str, InferTask]:
        return {n: ClassificationTask(m, f"exported bundle {m.root.name}") for n, m in self.models.items()}

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers = {}
        for n, m in self.models.items():
            try:
                if m.get().kind == "ct_clip_classfine":
                    trainers[n] = HeadTrainTask(m)
            except HTTPException as err:
                logger.error(err.detail)
        return trainers

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with 404 for an unknown model or image (it answers those with 500)."""
        model, image = request.get("model"), request.get("image")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; served: {sorted(self._infers)}")
        if isinstance(image, str) and not os.path.exists(image):
            store = datastore or self.datastore()
            if image not in store.list_images():
                raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore")
        return super().infer(request, datastore)
