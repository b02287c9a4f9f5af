"""Smoke runs of the performance benchmarks at reduced size on CPU (the figures themselves are GPU/full-size work:
docs/performance.md). They check what a benchmark could silently get wrong: a missing figure, a zero-shot path that
encodes a volume more than once, a FLOP count that makes the floor meaningless."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_flop_counter_counts_depthwise_conv_backward_and_cpu_attention():
    from memory import flop_counter

    conv = torch.nn.Conv3d(64, 64, 3, groups=64)
    x = torch.randn(1, 64, 6, 6, 6, requires_grad=True)
    counter = flop_counter()
    with counter:
        y = conv(x)
        forward = counter.get_total_flops()
        y.sum().backward()
    # forward: 2 * outputs * 27 per output; backward: the input and the weight gradient, one such product each
    assert forward == 2 * 64 * 4 ** 3 * 27
    assert counter.get_total_flops() == 3 * forward

    q = torch.randn(2, 4, 16, 8)
    counter = flop_counter()
    with counter, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 16 * 8)


def test_gpu_benchmark_smoke_on_cpu():
    import gpu

    args = gpu.parse_args(["--device", "cpu", "--size", "reduced", "--encoders", "ctvit", "--batches", "1",
                           "--steps", "1", "--zero-shot-batch", "2"])
    report = gpu.run(args)
    entry = report["encoders"]["ctvit"]
    assert "error" not in entry, entry.get("error")
    assert entry["config"] == "ctclip_tiny"
    assert report["matmul_flops_per_s"] > 0

    train = {(r["checkpointing"], r["batch"]): r for r in entry["train"]}
    assert set(train) == {(False, 1), (True, 1)}
    for row in train.values():
        assert not row.get("oom")
        assert row["samples_per_s"] > 0 and row["ratio_to_floor"] >= 1  # nothing beats the matmul rate
        assert math.isfinite(row["peak_mb"]) and row["peak_mb"] > 0
    # a step's FLOPs: forward and backward of both encoders, more than twice the image forward alone
    flops = entry["flops"]["1"]
    assert flops["train_step"] > 2 * flops["image_forward"] > 0

    paths = {r["path"]: r for r in entry["zero_shot"]}
    assert set(paths) == {"ours, exact", "ours, bfloat16", "reference procedure, exact"}
    for name in ("ours, exact", "ours, bfloat16"):
        assert paths[name]["image_passes_per_volume"] == 1, paths[name]
        assert paths[name]["encoder_calls"] == 2  # warm-up + one timed call, each on the batch of 2
    # the reference re-encodes the volume once per finding: the baseline the speed-up is measured against
    assert paths["reference procedure, exact"]["image_passes_per_volume"] == 18


def test_gpu_benchmark_covers_every_registered_encoder():
    import gpu
    from custom_nets.image_encoders import IMAGE_ENCODERS

    for size in ("full", "reduced"):
        configs = gpu.encoder_configs(size)
        assert set(configs) == set(IMAGE_ENCODERS)
    assert gpu.encoder_configs("full")["ctvit"] == "ctclip_v2"
    with pytest.raises(SystemExit, match="not registered"):
        gpu.run(gpu.parse_args(["--device", "cpu", "--encoders", "no_such_encoder", "--flops-only"]))


def test_retrieval_scaling_measures_the_library_against_the_full_matrix_baseline(capsys):
    import scaling

    args = scaling.argparse.Namespace(gallery=[40, 97], dim=16, block_mb=1, max_baseline_gb=2.0)
    rows = scaling.part_retrieval(args)
    assert [r["gallery"] for r in rows] == [40, 97]
    for r in rows:
        assert r["ours_s"] > 0 and r["baseline_s"] > 0 and r["floor_s"] > 0
        # the same metrics, up to the uniformity's summation order
        assert r["largest_difference"] < 1e-12, r["where"]
    assert "| 97 |" in capsys.readouterr().out


def test_loader_benchmark_measures_the_bundle_loader_against_a_training_step(tiny_preprocessed_dir, tmp_path):
    """``benchmarks/loader.py`` on the tiny cohort: every window, cache and worker setting asked for gets its
    epochs' volumes/s and its ratio to the step's samples/s."""
    import json

    import loader

    out = tmp_path / "loader.json"
    assert loader.main(["--dataset-dir", str(tiny_preprocessed_dir), "--model-config", "ctclip_tiny", "--workers",
                        "0", "1", "--caches", "none", "disk", "--batch-size", "2", "--epochs", "2", "--steps", "1",
                        "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["step"]["samples_per_s"] > 0
    rows = {(r["window"], r["cache"], r["workers"]): r for r in report["loader"]}
    assert set(rows) == {(w, c, n) for w in ("in_loader", "on_device") for c in ("none", "disk") for n in (0, 1)}
    for row in rows.values():
        assert len(row["epoch_volumes_per_s"]) == 2 and min(row["epoch_volumes_per_s"]) > 0
        assert row["ratio_to_step"] == pytest.approx(row["epoch_volumes_per_s"][-1] / report["step"]["samples_per_s"])
