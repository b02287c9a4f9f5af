"""retrieval.json end to end: the written metrics are the library's metrics of the latents the model gives
(image latents of the volumes, text latents of their reports), with the random baseline and the map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_nets import build_tokenizer, create_model
from workflows.retrieval import retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ct_clip_zeroshot"
CONFIGS = BUNDLE / "configs"
TOL = 1e-5


@pytest.fixture(scope="module")
def retrieval_run(tiny_preprocessed_dir, tiny_clip_checkpoint, tmp_path_factory):
    from monai.bundle import run

    out = tmp_path_factory.mktemp("zs_retrieval")
    run(config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "retrieval.json")],
        meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"), bundle_root=str(BUNDLE),
        dataset_dir=str(tiny_preprocessed_dir), output_dir=str(out), model_config="ctclip_tiny",
        pretrained=str(tiny_clip_checkpoint), split="all", num_workers=0, batch_size=2)
    return out / "retrieval"


def test_written_metrics_are_the_metrics_of_the_written_latents(retrieval_run, tiny_preprocessed_dir):
    metrics = json.loads((retrieval_run / "metrics.json").read_text())
    lat = np.load(retrieval_run / "latents.npz")
    datalist = json.loads((tiny_preprocessed_dir / "datalist.json").read_text())
    items = {it["name"]: it for split in datalist.values() for it in split}
    names = [str(n) for n in lat["names"]]
    assert sorted(names) == sorted(items) and metrics["n"] == len(items) == metrics["report_to_volume"]["n_queries"]
    labels = np.array([items[n]["label"] for n in names])
    expected = retrieval_metrics(lat["image_latents"], lat["text_latents"], labels=labels, ks=(1, 5, 10, 50, 100),
                                 map_ks=(1, 5, 10, 50))
    for section in ("report_to_volume", "volume_to_report", "volume_to_volume", "embedding"):
        for key, value in expected[section].items():
            got = metrics[section][key]
            if isinstance(value, float):
                assert got == pytest.approx(value, abs=1e-9), f"{section}.{key}"
            else:
                assert got == value, f"{section}.{key}"
    n = metrics["n"]
    for k in (1, 5, 10):  # the random baseline is reported beside every recall@k
        assert metrics["report_to_volume"][f"random_recall@{k}"] == pytest.approx(min(k, n) / n)
    assert metrics["split"] == "all" and metrics["model_config"] == "ctclip_tiny"
    png = (retrieval_run / "latent_map.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_latents_are_the_models_image_and_report_latents(retrieval_run, tiny_preprocessed_dir, tiny_clip_checkpoint):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from transforms import ToModelInputd

    lat = np.load(retrieval_run / "latents.npz")
    names = [str(n) for n in lat["names"]]
    model = create_model("ctclip_tiny", checkpoint=str(tiny_clip_checkpoint)).eval()
    datalist = json.loads((tiny_preprocessed_dir / "datalist.json").read_text())
    item = datalist["validation"][0]
    row = names.index(item["name"])
    load = Compose([LoadImaged("image", reader="ITKReader", image_only=True), EnsureChannelFirstd("image"),
                    ToModelInputd.from_model_config("image", model.config)])
    image = load({"image": str(tiny_preprocessed_dir / item["image"])})["image"]
    # ctclip_tiny reads Findings then Impressions (text.report_sections)
    text = f"{item['findings'].strip()} {item['impressions'].strip()}"
    tok = build_tokenizer(model.config)(text, padding="max_length", truncation=True,
                                        max_length=model.config["text"]["max_length"], return_tensors="pt")
    with torch.no_grad():
        img = model.encode_image(image.as_tensor()[None])[0].numpy()
        txt = model.encode_text(tok["input_ids"], tok["attention_mask"])[0].numpy()
    assert np.abs(lat["image_latents"][row] - img).max() <= TOL
    assert np.abs(lat["text_latents"][row] - txt).max() <= TOL
    # a different report gives a different latent: the text of each volume really is its own report
    other = names.index(datalist["test"][0]["name"])
    assert np.abs(lat["text_latents"][other] - txt).max() > 1e-5  # (a random tiny BERT: small but real)
