"""Image encoders side by side: forward time and peak memory of each registered encoder of the given model configs
on the same input, in one run, with the ratio to the first config.

Usage::

    .venv/bin/python benchmarks/image_encoders.py [--configs ctclip_small slicefusion_small] [--batch 2]
        [--repeats 5] [--slices N] [--depths 32 64 128] [--no_seg] [--train] [--device cpu|cuda]
        [--dtype float32|bfloat16]

Each config runs in its own child process, so each peak is its own: the encoder alone is built (the text side is
not part of the comparison), with seeded random weights (``load_pretrained_weights`` off: no download, the same
architecture), and encodes a ``(batch, 1, D, H, W)`` volume of the config's input shape (``--slices`` overrides D,
e.g. 240 for CT-RATE's full depth). Reported per config:

* ``forward_s``: median eval forward (``torch.no_grad``) over ``--repeats`` after one warm-up; ``forward_cpu_s`` the
  same in CPU seconds of the process (``time.process_time``, all threads), steadier on a shared machine;
* ``train_step_s`` (``--train``): forward + backward of the global embedding, as pretraining runs it;
* peak memory above the built model: on CPU the growth of the peak RSS (Linux ``ru_maxrss``; the first forward's
  allocations are counted, as that is what a machine must have), on CUDA ``torch.cuda.max_memory_allocated``.

An encoder that reads anatomical masks (``ct_specialised`` with ``num_regions``) gets one, as pretraining would give
it: blocks of random region ids on a coarse grid (``--no_seg``: none, regions off). ``--depths 32 64 128`` also runs
every config at each of those slice counts and prints how time and memory grow with depth, relative to the first.

The CT-specialised encoder against CTViT: ``--configs ctclip_small ctspecialised_small --depths 32 64 128``.
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


def region_mask(shape: tuple, num_regions: int, block: int = 8, seed: int = 0):
    """``(B, 1, D, H, W)`` region ids ``0..num_regions`` in blocks of ``block`` voxels (a stand-in for a real mask:
    the encoder's cost does not depend on where the regions lie, only on their count and the grid)."""
    import torch
    import torch.nn.functional as F

    b, _, d, h, w = shape
    coarse = torch.randint(0, num_regions + 1, (b, 1, -(-d // block), -(-h // block), -(-w // block)),
                           generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse.float(), scale_factor=block, mode="nearest")[..., :d, :h, :w].long()


def worker(config: str, batch: int, repeats: int, slices: int | None, train: bool, device: str, dtype: str,
           seg: bool = True) -> None:
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
    regions = getattr(encoder, "num_regions", 0) if getattr(encoder, "uses_segmentation", False) and seg else 0
    kwargs = {"seg": region_mask(shape, regions).to(device)} if regions else {}
    cuda = device.startswith("cuda")
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype),
                              enabled=dtype != "float32")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad(), autocast:
            return encoder.encode_volume(volume, **kwargs).embedding

    def train_step():
        with autocast:
            emb = encoder.encode_volume(volume, **kwargs).embedding
        emb.float().square().mean().backward()

    rss_built = rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    results = {"config": config, "encoder": cfg.image_encoder[0], "input": list(shape), "device": device,
               "dtype": dtype, "threads": torch.get_num_threads(), "regions": regions,
               "parameters_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
               "trainable_m": sum(p.numel() for p in encoder.parameters() if p.requires_grad) / 1e6}
    encoder.eval()
    for name, step in (("forward", forward),) + ((("train_step", train_step),) if train else ()):
        if name == "train_step":
            encoder.train()
        times, cpu_times = [], []
        for _ in range(repeats + 1):  # the first is the warm-up
            sync()
            t, c = time.perf_counter(), time.process_time()
            step()
            sync()
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
        results[f"{name}_s"] = statistics.median(times[1:]) if repeats else times[0]
        # CPU seconds of the process (all its threads): on a shared machine steadier than the wall clock, which
        # counts the time other jobs hold the cores
        results[f"{name}_cpu_s"] = statistics.median(cpu_times[1:]) if repeats else cpu_times[0]
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
    parser.add_argument("--depths", type=int, nargs="*", default=[],
                        help="also run every config at these slice counts and print the scaling with depth")
    parser.add_argument("--no_seg", action="store_true", help="no anatomical mask for encoders that read one")
    parser.add_argument("--train", action="store_true", help="also time forward + backward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batch, args.repeats, args.slices, args.train, args.device, args.dtype,
                      seg=not args.no_seg)

    def run(config: str, slices: int | None) -> dict:
        cmd = [sys.executable, __file__, "--worker", config, "--batch", str(args.batch), "--repeats",
               str(args.repeats), "--device", args.device, "--dtype", args.dtype]
        cmd += (["--slices", str(slices)] if slices else []) + (["--train"] if args.train else [])
        cmd += ["--no_seg"] if args.no_seg else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            sys.exit(f"{config} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        print(lines[-1], flush=True)
        return json.loads(lines[-1])

    rows = [run(config, args.slices) for config in args.configs]
    scaling = {config: [run(config, d) for d in args.depths] for config in args.configs} if args.depths else {}

    first = rows[0]
    keys = ["forward_s", "forward_cpu_s", "forward_peak_mb"] + (
        ["train_step_s", "train_step_cpu_s", "train_step_peak_mb"] if args.train else [])
    print(f"\ninput {tuple(first['input'])}, {args.device} {args.dtype}, threads {first['threads']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| config | encoder | parameters (M) | trainable (M) | " + " | ".join(keys) + " | ratio to "
          + first["config"] + " (" + ", ".join(keys) + ") |")
    print("|---" * (5 + len(keys)) + "|")
    for r in rows:
        ratios = ", ".join(f"{r[k] / first[k]:.2f}x" if first[k] > 0 else "n/a" for k in keys)
        print(f"| {r['config']} | {r['encoder']} | {r['parameters_m']:.2f} | {r['trainable_m']:.2f} | "
              + " | ".join(f"{r[k]:.3f}" if k.endswith("_s") else f"{r[k]:.0f}" for k in keys) + f" | {ratios} |")
    if scaling:
        print(f"\nscaling with depth (slices {', '.join(map(str, args.depths))}; ratios to {args.depths[0]} slices)")
        print("| config | " + " | ".join(f"{k} at {d}" for d in args.depths for k in keys) + " | ratios |")
        print("|---" * (2 + len(keys) * len(args.depths)) + "|")
        for config, runs in scaling.items():
            cells = [f"{r[k]:.3f}" if k.endswith("_s") else f"{r[k]:.0f}" for r in runs for k in keys]
            ratios = "; ".join(f"{r['input'][2]}: " + ", ".join(f"{r[k] / runs[0][k]:.2f}x" if runs[0][k] > 0
                                                                  else "n/a" for k in keys) for r in runs[1:])
            print(f"| {config} | " + " | ".join(cells) + f" | {ratios} |")


if __name__ == "__main__":
    main()
