"""Image encoders side by side: forward time and peak memory of each registered encoder of the given model configs
on the same input, in one run, with the ratio to the first config.

Usage::

    .venv/bin/python benchmarks/image_encoders.py [--configs ctclip_small slicefusion_small] [--batch 2]
        [--repeats 5] [--slices N] [--train] [--device cpu|cuda] [--dtype float32|bfloat16]

Each config runs in its own child process, so each peak is its own: the encoder alone is built (the text side is
not part of the comparison), with seeded random weights (``load_pretrained_weights`` off: no download, the same
architecture), and encodes a ``(batch, 1, D, H, W)`` volume of the config's input shape (``--slices`` overrides D,
e.g. 240 for CT-RATE's full depth). Reported per config:

* ``forward_s``: median eval forward (``torch.no_grad``) over ``--repeats`` after one warm-up;
* ``train_step_s`` (``--train``): forward + backward of the global embedding, as pretraining runs it;
* peak memory above the built model: on CPU the growth of the peak RSS (Linux ``ru_maxrss``; the first forward's
  allocations are counted, as that is what a machine must have), on CUDA ``torch.cuda.max_memory_allocated``.

Both sizes of the slice-fusion issue: ``--configs ctclip_small slicefusion_small`` (the demo's size) and, on a GPU,
``--configs slicefusion_dinov2_base --slices 240 --batch 2 --dtype bfloat16 --train --device cuda`` (ViT-B/14, 240
slices of 224x224, the frozen backbone). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from memory import rss_mb  # benchmarks/ is on sys.path when a script runs


def _no_download(config: str) -> dict:
    """Overrides that keep every pretrained part of a config as architecture only (random weights, no hub)."""
    from ctclip_contract import load_model_config

    kind, settings = load_model_config(config).image_encoder
    if kind == "slice_fusion":
        return {"image_encoder": {"backbone": {"load_pretrained_weights": False}}}
    return {}


def worker(config: str, batch: int, repeats: int, slices: int | None, train: bool, device: str, dtype: str) -> None:
    import torch

    from ctclip_contract import load_model_config
    from custom_nets.image_encoders import build_image_encoder

    torch.manual_seed(0)
    cfg = load_model_config(config, _no_download(config))
    if slices:
        x, y, _ = cfg.input.spatial_size
        cfg = cfg.merged({"input": {"spatial_size": [x, y, slices]}})
    encoder = build_image_encoder(cfg).to(device)
    shape = (batch,) + cfg.input.model_input_shape
    volume = (torch.rand(shape, device=device) * 2 - 1)  # model-input units span [-1, 1] for HU in [-1000, 1000]
    cuda = device.startswith("cuda")
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype),
                              enabled=dtype != "float32")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad(), autocast:
            return encoder.encode_volume(volume).embedding

    def train_step():
        with autocast:
            emb = encoder.encode_volume(volume).embedding
        emb.float().square().mean().backward()

    rss_built = rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    results = {"config": config, "encoder": cfg.image_encoder[0], "input": list(shape), "device": device,
               "dtype": dtype, "threads": torch.get_num_threads(),
               "parameters_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
               "trainable_m": sum(p.numel() for p in encoder.parameters() if p.requires_grad) / 1e6}
    encoder.eval()
    for name, step in (("forward", forward),) + ((("train_step", train_step),) if train else ()):
        if name == "train_step":
            encoder.train()
        times = []
        for _ in range(repeats + 1):  # the first is the warm-up
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        results[f"{name}_s"] = statistics.median(times[1:]) if repeats else times[0]
        if cuda:
            results[f"{name}_peak_mb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            # ru_maxrss only grows: the eval figure is the forward's, the train figure the larger of the two
            results[f"{name}_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_built
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["ctclip_small", "slicefusion_small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=None, help="override the input's slice count D")
    parser.add_argument("--train", action="store_true", help="also time forward + backward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batch, args.repeats, args.slices, args.train, args.device, args.dtype)

    rows = []
    for config in args.configs:
        cmd = [sys.executable, __file__, "--worker", config, "--batch", str(args.batch), "--repeats",
               str(args.repeats), "--device", args.device, "--dtype", args.dtype]
        cmd += (["--slices", str(args.slices)] if args.slices else []) + (["--train"] if args.train else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            sys.exit(f"{config} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1]))
        print(json.dumps(rows[-1]), flush=True)

    first = rows[0]
    keys = ["forward_s", "forward_peak_mb"] + (["train_step_s", "train_step_peak_mb"] if args.train else [])
    print(f"\ninput {tuple(first['input'])}, {args.device} {args.dtype}, threads {first['threads']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| config | encoder | parameters (M) | trainable (M) | " + " | ".join(keys) + " | ratio to "
          + first["config"] + " (" + ", ".join(keys) + ") |")
    print("|---" * (5 + len(keys)) + "|")
    for r in rows:
        ratios = ", ".join(f"{r[k] / first[k]:.2f}x" if first[k] > 0 else "n/a" for k in keys)
        print(f"| {r['config']} | {r['encoder']} | {r['parameters_m']:.2f} | {r['trainable_m']:.2f} | "
              + " | ".join(f"{r[k]:.3f}" if k.endswith("_s") else f"{r[k]:.0f}" for k in keys) + f" | {ratios} |")


if __name__ == "__main__":
    main()
