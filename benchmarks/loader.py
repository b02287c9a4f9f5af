"""Does the training DataLoader keep the model fed? Volumes/s the pretraining bundle's DataLoader delivers against the
samples/s one training step consumes, in one run.

Usage::

    .venv/bin/python benchmarks/loader.py --dataset-dir DIR [--model-config ctclip_small] [--workers 1 2 4]
        [--caches none memory disk] [--windows in_loader on_device] [--batch-size 8] [--epochs 2] [--max-items N]

The DataLoader is the one ``bundles/ct_clip_pretrain/configs/train.json`` builds (``train#dataloader``: its
datalist, load transforms, report tokenisation, ``make_dataset`` cache, batch size, shuffling, persistent workers),
parsed with MONAI's ``ConfigParser`` and only ``dataset_dir``, ``model_config``, ``num_workers``, ``cache``,
``cache_dir``, ``batch_size`` and ``window_on_device`` overridden. For each window, cache and worker count it iterates ``--epochs`` epochs and
reports volumes/s of each (the first epoch of a cache fills it: the memory cache while the dataset is built, the
disk cache while reading; the last epoch is the steady state a long training sees), and the time to build the
dataset. The model side is one training step of the same bundle network (:func:`gpu.train_rows`: forward, CLIP
loss, backward, AdamW) at the same batch size on random inputs of the config's shape, best of ``--steps``.

Printed: the table, each loader figure's ratio to the step's samples/s (>= 1: the loader is not the bottleneck) and
the load average. The test suite runs it once on a tiny cohort (``tests/test_benchmarks_smoke.py``), for its
figures, not their values.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from memory import machine_state, timed

REPO = Path(__file__).resolve().parents[1]


def build_loader(dataset_dir: str, model_config: str, workers: int, cache: str, cache_dir: str, batch_size: int,
                 max_items: int | None = None, window_on_device: bool = False):
    """The pretraining bundle's training DataLoader with these settings, and the seconds its dataset took to build
    (a memory cache is filled then). ``window_on_device``: the loader delivers stored int16 (the bundle's
    ``window_on_device``; the window is then the trainer's, on the device)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "ct_clip_pretrain" / "configs" / "train.json"))
    parser.update({"bundle_root": str(REPO / "bundles" / "ct_clip_pretrain"), "dataset_dir": dataset_dir,
                   "model_config": model_config, "num_workers": workers, "cache": cache, "cache_dir": cache_dir,
                   "batch_size": batch_size, "max_train_items": max_items, "output_dir": cache_dir,
                   "window_on_device": window_on_device})
    t0 = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")
    return loader, time.perf_counter() - t0


def epoch_rates(loader, epochs: int) -> list[float]:
    """Volumes/s of each epoch (the first batch's wait, worker start-up included, counts: training waits for it)."""
    rates = []
    for _ in range(epochs):
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            n += batch["image"].shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return rates


def step_rate(model_config: str, batch_size: int, steps: int, text_tokens: int = 24) -> dict:
    """Samples/s of one training step of the bundle's network at this batch size, on CPU, float32 (the bundle's
    precision on CPU), without checkpointing (the bundle's default)."""
    import custom_nets as cn
    from gpu import train_rows

    torch.manual_seed(0)
    model = cn.create_model(model_config)
    row = train_rows(model, "cpu", [batch_size], "float32", steps, text_tokens, checkpoint_settings=(False,))[0]
    return row


def full_size_item_seconds(workdir: str, repeats: int = 3) -> dict:
    """Seconds one worker takes per full-size (ctclip_v2: 480x480x240) training volume through the bundle's image load
    transforms (``load_transforms`` 0-4: check, ``LoadImaged``, channel, ``ToModelInputd``, dtype) and half the
    collation of a batch of two, best of ``repeats``, in four variants:

    - ``window_in_loader`` / ``window_on_device``: the bundle's ``window_on_device`` false (float32 model input) or
      true (stored int16 in the model's axis order; the window then runs in ``prepare_batch`` on the GPU: its cost
      on this CPU is reported as ``device_window_cpu_s``, for reference);
    - ``read`` / ``disk_cache``: the ``.nii.gz`` read every epoch, or the bundle's disk cache (``make_dataset``
      ``cache="disk"``, filled once) read back.

    The volume: the preprocessing benchmark's phantom (512x512x300, 15 HU noise) through ``CTPreprocessor`` (int16
    ``.nii.gz`` as ct_preprocess writes it). The report's tokenisation is left out (sub-millisecond)."""
    from monai.bundle import ConfigParser
    from monai.data import list_data_collate
    from monai.transforms import Compose

    from preprocess import make_volume  # benchmarks/preprocess.py: the same phantom as the preprocessing benchmark
    from transforms import HUWindow
    from workflows.datasets import make_dataset
    from workflows.preprocess_cohort import CTPreprocessor

    raw = Path(workdir) / "raw.nii.gz"
    make_volume(raw)
    runner = CTPreprocessor(str(raw), str(Path(workdir) / "pre"), model_config="ctclip_v2", progress=False,
                            resume=False)
    rec = runner.process_item({"name": "bench", "path": str(raw), "input": "raw.nii.gz", "patient": "p"})
    if rec["status"] != "ok":
        raise RuntimeError(f"preprocessing the full-size phantom failed: {rec.get('reason')}")
    stored = next((Path(workdir) / "pre" / "volumes").glob("*.nii.gz"))
    item = {"image": str(stored), "label": [0] * 18, "name": "bench"}
    out = {"stored_mb": stored.stat().st_size / 2 ** 20, "variants": {}}
    for deferred in (False, True):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / "ct_clip_pretrain" / "configs" / "train.json"))
        parser.update({"bundle_root": str(REPO / "bundles" / "ct_clip_pretrain"), "model_config": "ctclip_v2",
                       "window_on_device": deferred})
        load = Compose([parser.get_parsed_content(f"load_transforms#{i}") for i in range(5)])
        cached = make_dataset([item], load, cache="disk", cache_dir=str(Path(workdir) / f"cache_{deferred}"),
                              cache_key=deferred)
        cached[0]  # fills the cache
        window = "window_on_device" if deferred else "window_in_loader"
        for source, get in (("read", lambda: load(dict(item))), ("disk_cache", lambda: cached[0])):
            t_get = min(timed(get, repeats=repeats, warmup=1))
            d = get()
            t_collate = min(timed(lambda: list_data_collate([d, d]), repeats=repeats, warmup=1)) / 2
            out["variants"][f"{window}/{source}"] = {
                "seconds": t_get + t_collate, "read_and_transforms_s": t_get, "collate_s": t_collate,
                "dtype": str(d["image"].dtype), "mb": d["image"].numel() * d["image"].element_size() / 2 ** 20}
        if deferred:
            batch = list_data_collate([load(dict(item))])["image"]
            hu = HUWindow.from_model_config("ctclip_v2")
            out["device_window_cpu_s"] = min(timed(lambda: hu(batch), repeats=repeats, warmup=1))
    out["shape"] = list(d["image"].shape)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", required=True, help="a ct_preprocess output folder of this model config")
    parser.add_argument("--model-config", default="ctclip_small")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--caches", nargs="+", default=["none", "memory", "disk"], choices=("none", "memory", "disk"))
    parser.add_argument("--windows", nargs="+", default=["in_loader", "on_device"], choices=("in_loader", "on_device"),
                        help="the bundle's window_on_device false (float32 items) and/or true (int16 items)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-items", type=int, default=None, help="first N training items only")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (best reported)")
    parser.add_argument("--full-size", action="store_true",
                        help="also time one worker loading a full-size ctclip_v2 volume, for the CT-RATE arithmetic")
    parser.add_argument("--node-workers", type=int, default=15, help="loader workers of the node (16 cores - 1)")
    parser.add_argument("--gpu-samples-per-s", type=float, default=None,
                        help="measured full-size training samples/s on the GPU (benchmarks/gpu.py); default: "
                             "gpu.py's FLOP estimate")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    full = None
    if args.full_size:
        with tempfile.TemporaryDirectory(prefix="loader_full_") as tmp:
            full = full_size_item_seconds(tmp)
        if args.gpu_samples_per_s:
            gpu_rate, source = args.gpu_samples_per_s, "measured on the GPU"
        else:
            import gpu

            flops = gpu.count_flops("ctclip_v2", 1, 160)["train_step"]
            gpu_rate = 0.4 * gpu.H100_BF16_DENSE_TFLOPS * 1e12 / flops
            source = f"FLOP estimate at 40% of an H100's bf16 peak ({flops / 1e12:.2f} TFLOP per sample)"
        full.update(node_workers=args.node_workers, gpu_samples_per_s=gpu_rate, gpu_source=source)
        print(f"full size, one worker per 480x480x240 volume ({full['stored_mb']:.0f} MB stored); "
              f"{args.node_workers} workers if they scale (this machine has {os.cpu_count()} cores) against "
              f"ctclip_v2 training on one GPU, {gpu_rate:.1f} samples/s ({source}); {machine_state()}")
        print("| window | source | item dtype | item MB | read + transforms s | collate s | s per volume | "
              f"{args.node_workers} workers volumes/s | loader / GPU |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for name, v in full["variants"].items():
            node = args.node_workers / v["seconds"]
            v.update(node_volumes_per_s=node, ratio_to_gpu=node / gpu_rate)
            print(f"| {' | '.join(name.split('/'))} | {v['dtype'].replace('torch.', '')} | {v['mb']:.0f} | "
                  f"{v['read_and_transforms_s']:.3f} | {v['collate_s']:.3f} | {v['seconds']:.3f} | {node:.1f} | "
                  f"{node / gpu_rate:.2f}x |")
        print(f"window_on_device: the HU window of one batch item on this CPU {full['device_window_cpu_s']:.3f} s "
              "(on the GPU instead, in prepare_batch)", flush=True)
        # what the disk must deliver at the GPU's rate: a CT-RATE-size cache does not fit in the page cache
        for name, v in full["variants"].items():
            read_mb = full["stored_mb"] if name.endswith("/read") else v["mb"]
            print(f"{name}: {read_mb:.0f} MiB read per volume, {gpu_rate * read_mb / 1024:.1f} GiB/s from disk at the "
                  f"GPU's {gpu_rate:.0f} samples/s", flush=True)

    step = step_rate(args.model_config, args.batch_size, args.steps)
    print(f"training step ({args.model_config}, batch {args.batch_size}, CPU float32): "
          f"{step['samples_per_s']:.2f} samples/s; {machine_state()}", flush=True)
    rows = []
    for window in args.windows:
        for cache in args.caches:
            for workers in args.workers:
                tmp = tempfile.mkdtemp(prefix="loader_cache_")
                try:
                    loader, build_s = build_loader(args.dataset_dir, args.model_config, workers, cache, tmp,
                                                   args.batch_size, args.max_items, window == "on_device")
                    rates = epoch_rates(loader, args.epochs)
                    del loader
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                rows.append({"window": window, "cache": cache, "workers": workers, "build_s": build_s,
                             "epoch_volumes_per_s": rates, "ratio_to_step": rates[-1] / step["samples_per_s"],
                             "load": machine_state()})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| window | cache | workers | dataset build s | " + " | ".join(f"epoch {i + 1} volumes/s" for i in range(args.epochs))
          + " | last epoch / step samples/s |")
    print("|---|---|---:|---:|" + "---:|" * args.epochs + "---:|")
    for r in rows:
        print(f"| {r['window']} | {r['cache']} | {r['workers']} | {r['build_s']:.1f} | "
              + " | ".join(f"{v:.1f}" for v in r["epoch_volumes_per_s"]) + f" | {r['ratio_to_step']:.2f}x |")
    print(f"training step: {step['samples_per_s']:.2f} samples/s (batch {args.batch_size}); {machine_state()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"step": step, "loader": rows, "full_size": full}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
