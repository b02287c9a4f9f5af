"""How cost grows with the work: preprocessing against volumes and workers, zero-shot against the number of prompts,
retrieval against the gallery size, a training step against the batch size; each against its baseline and floor.

Usage::

    .venv/bin/python benchmarks/scaling.py [--parts preprocess zero_shot retrieval train]
        [--cohort DIR] [--volumes 4 8 16] [--workers 0 1 2] [--classes 18 36 72 144]
        [--gallery 1000 10000 50000] [--batches 1 2 4 8] [--model-config ctclip_small]

* ``preprocess``: :class:`workflows.preprocess_cohort.CTPreprocessor` (``ctclip_tiny`` contract) on the first N
  patients of a raw cohort (``--cohort``; default: a tiny generated one), with 0, 1, 2 workers: seconds and
  volumes/s; the ratio to N times the single-volume cost of the smallest run (linear scaling) and the
  speed-up over 0 workers.
* ``zero_shot``: :class:`custom_nets.ZeroShotClassifier` on one volume with 18 .. 144 classes (2 prompts each), prompts
  encoded cold: seconds, image-encoder passes (must stay 1), prompt-encoding share; the baseline is the
  reference's one image pass per class, priced at the measured image-pass time.
* ``retrieval``: every one of N report latents against a gallery of N volume latents (512-d): top-10 by blocks of
  queries whose similarity rows fit ``--block-mb`` (:func:`blockwise_top_k`), against the full similarity matrix
  of :func:`workflows.retrieval.similarity_matrix` (float64, N x N) where that fits in ``--max-baseline-gb``; the
  floor is ``2 N^2 d`` FLOPs at the measured matmul rate; peak RSS above the start of each.
* ``train``: one training step of the pretraining network (:func:`gpu.train_rows`, CPU float32) at each batch
  size: samples/s, peak RSS, and the ratio to the FLOP floor.

Every figure is printed with the load average. Not part of the test suite.
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

import numpy as np
import torch

from memory import flop_counter, machine_state, matmul_rate, peak_rss_mb, reset_peak_rss, rss_mb, timed


def blockwise_top_k(queries: torch.Tensor, gallery: torch.Tensor, k: int = 10,
                    block_bytes: int = 256 * 2 ** 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities of each query in the gallery, ``(Q, k)`` scores and indices, computing the
    similarity rows of as many queries at a time as fit in ``block_bytes`` (float32): memory ``O(block + Q k)``
    instead of the ``Q x N`` matrix."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    rows = max(1, block_bytes // (4 * g.shape[0]))
    scores, indices = [], []
    for block in q.split(rows):
        s, i = (block @ g.t()).topk(min(k, g.shape[0]), dim=-1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def full_matrix_top_k(queries: np.ndarray, gallery: np.ndarray, k: int = 10) -> np.ndarray:
    """The baseline: the whole similarity matrix (the retrieval metrics' :func:`similarity_matrix`), then top-k."""
    from workflows.retrieval import similarity_matrix

    sim = similarity_matrix(queries, gallery)
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-sim, top, axis=1).argsort(axis=1)
    return np.take_along_axis(top, order, axis=1)


# --------------------------------------------------------------------------------------------------- parts
def part_preprocess(args) -> list[dict]:
    from workflows.preprocess_cohort import CTPreprocessor

    cohort = Path(args.cohort) if args.cohort else None
    tmp = Path(tempfile.mkdtemp(prefix="scaling_pre_"))
    try:
        if cohort is None:
            from chest_phantom.cohort import generate_cohort

            cohort = tmp / "cohort"
            generate_cohort(cohort, num_cases=max(args.volumes), seed=3, geometry="tests", num_workers=1,
                            progress=False)
        patients = sorted(p for p in (cohort / "volumes").iterdir() if p.is_dir())
        rows = []
        for n in args.volumes:
            sub = tmp / f"sub_{n}"
            (sub / "volumes").mkdir(parents=True)
            for f in cohort.iterdir():  # the cohort's tables; only the first n patients' volumes (copied:
                if f.is_file():             # discovery does not follow links)
                    shutil.copy2(f, sub / f.name)
                elif f.name != "volumes":
                    shutil.copytree(f, sub / f.name)
            for p in patients[:n]:
                shutil.copytree(p, sub / "volumes" / p.name)
            if n == args.volumes[0]:  # untimed warm-up: imports, first-use caches, the page cache of the inputs
                CTPreprocessor(input_dir=str(sub), output_dir=str(tmp / "warmup"), model_config="ctclip_tiny",
                               num_workers=0, progress=False, resume=False).run()
            for workers in args.workers:
                out = tmp / f"out_{n}_{workers}"
                runner = CTPreprocessor(input_dir=str(sub), output_dir=str(out), model_config="ctclip_tiny",
                                        num_workers=workers, progress=False, resume=False)
                t0 = time.perf_counter()
                runner.run()
                seconds = time.perf_counter() - t0
                datalist = json.loads((out / "datalist.json").read_text())
                written = sum(len(v) for v in datalist.values() if isinstance(v, list))
                rows.append({"patients": n, "volumes": written, "workers": workers, "seconds": seconds,
                             "volumes_per_s": written / seconds, "load": machine_state()})
                shutil.rmtree(out, ignore_errors=True)
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_volume = {w: min(r["seconds"] / r["volumes"] for r in rows if r["workers"] == w) for w in args.workers}
    print("\n| patients | volumes | workers | seconds | volumes/s | vs linear (N x best s/volume) | vs 0 workers |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        serial = next((x for x in rows if x["patients"] == r["patients"] and x["workers"] == args.workers[0]), r)
        print(f"| {r['patients']} | {r['volumes']} | {r['workers']} | {r['seconds']:.1f} | {r['volumes_per_s']:.2f} | "
              f"{r['seconds'] / (r['volumes'] * per_volume[r['workers']]):.2f}x | "
              f"{serial['seconds'] / r['seconds']:.2f}x |")
    return rows


def part_zero_shot(args) -> list[dict]:
    import custom_nets as cn

    torch.manual_seed(0)
    model = cn.create_model(args.model_config, ctclip={"text_cache_size": 0}).eval()  # prompts encoded cold
    tokenizer = cn.build_tokenizer(model.config)
    volume = torch.rand((1,) + cn.image_input_shape(model.config)) * 2 - 1
    encoder = model.visual_transformer
    passes = [0]
    encode_volume = encoder.encode_volume

    def counted(image, *a, **kw):
        passes[0] += image.shape[0]
        return encode_volume(image, *a, **kw)

    encoder.encode_volume = counted
    rows = []
    try:
        with torch.inference_mode():
            image_s = float("inf")
            for n in args.classes:
                names = [f"finding number {i}" for i in range(n)]
                zs = cn.ZeroShotClassifier.from_config(model, model.config, tokenizer=tokenizer, class_names=names)
                passes[0] = 0
                best, prompt_s = float("inf"), float("inf")
                zs(volume)  # warm-up
                passes[0] = 0
                for _ in range(args.repeats):
                    zs.refresh_prompts()
                    t0 = time.perf_counter()
                    zs.prompt_latents()
                    p = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    zs(volume)
                    total = time.perf_counter() - t0
                    best, prompt_s = min(best, total), min(prompt_s, p)
                    image_s = min(image_s, time.perf_counter() - t1)  # the image pass and the scoring
                rows.append({"classes": n, "prompts": len(zs.prompts()), "seconds": best, "prompt_s": prompt_s,
                             "image_passes": passes[0] / args.repeats, "load": machine_state()})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        del encoder.encode_volume
    for r in rows:  # the reference: one image pass per class (priced at our best pass) and the same prompts
        r["reference_s"] = r["classes"] * image_s + r["prompt_s"]
    print(f"\n{args.model_config}, one volume; one image pass (best) {image_s:.3f} s")
    print("| classes | prompts | seconds | prompt encoding s | image passes | reference (one pass per class) s | "
          "reference / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['classes']} | {r['prompts']} | {r['seconds']:.3f} | {r['prompt_s']:.3f} | {r['image_passes']:g} "
              f"| {r['reference_s']:.2f} | {r['reference_s'] / r['seconds']:.1f}x |")
    return rows


def part_retrieval(args) -> list[dict]:
    rate = matmul_rate(torch.float32)
    rows = []
    for n in args.gallery:
        g = torch.Generator().manual_seed(n)
        queries, gallery = torch.randn(n, args.dim, generator=g), torch.randn(n, args.dim, generator=g)
        base_rss = rss_mb()
        reset_peak_rss()
        t0 = time.perf_counter()
        _, idx = blockwise_top_k(queries, gallery, k=10, block_bytes=args.block_mb * 2 ** 20)
        ours_s = time.perf_counter() - t0
        row = {"gallery": n, "ours_s": ours_s, "ours_peak_mb": peak_rss_mb() - base_rss,
               "floor_s": 2 * n * n * args.dim / rate, "baseline_matrix_gb": n * n * 8 / 2 ** 30}
        if row["baseline_matrix_gb"] <= args.max_baseline_gb:
            reset_peak_rss()
            t0 = time.perf_counter()
            ref = full_matrix_top_k(queries.numpy(), gallery.numpy(), k=10)
            row.update(baseline_s=time.perf_counter() - t0, baseline_peak_mb=peak_rss_mb() - base_rss,
                       top1_agree=float((ref[:, 0] == idx[:, 0].numpy()).mean()))
        row["load"] = machine_state()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.dim}-d latents, N queries against N gallery items, top-10; fp32 matmul {rate / 1e9:.0f} GFLOP/s")
    print("| gallery N | ours s | ours peak MB | floor s | ours / floor | full matrix (float64) | baseline s | "
          "baseline peak MB | baseline / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = (f"{r['baseline_s']:.2f} | {r['baseline_peak_mb']:.0f} | {r['baseline_s'] / r['ours_s']:.1f}x"
                if "baseline_s" in r else "not run (does not fit) | | ")
        print(f"| {r['gallery']} | {r['ours_s']:.2f} | {r['ours_peak_mb']:.0f} | {r['floor_s']:.2f} | "
              f"{r['ours_s'] / r['floor_s']:.1f}x | {r['baseline_matrix_gb']:.2f} GB | {base} |")
    return rows


def part_train(args) -> list[dict]:
    import custom_nets as cn
    from gpu import count_flops, no_download, train_rows

    rate = matmul_rate(torch.float32)
    torch.manual_seed(0)
    model = cn.create_model(args.model_config, **no_download(args.model_config))
    rows = train_rows(model, "cpu", args.batches, "float32", args.repeats, 24, checkpoint_settings=(False,))
    for r in rows:
        r["floor_s"] = count_flops(args.model_config, r["batch"], 24)["train_step"] / rate
        r["load"] = machine_state()
    print(f"\n{args.model_config} training step, CPU float32; fp32 matmul {rate / 1e9:.0f} GFLOP/s")
    print("| batch | step s | samples/s | peak RSS MB | floor s | step / floor |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_s']:.2f} | {r['samples_per_s']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['floor_s']:.3f} | {r['step_s'] / r['floor_s']:.1f}x |")
    return rows


PARTS = {"preprocess": part_preprocess, "zero_shot": part_zero_shot, "retrieval": part_retrieval,
         "train": part_train}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--cohort", help="raw cohort (synthetic_chest_ct layout); default: generate a tiny one")
    parser.add_argument("--volumes", type=int, nargs="+", default=[4, 8, 16], help="patients preprocessed")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--classes", type=int, nargs="+", default=[18, 36, 72, 144])
    parser.add_argument("--gallery", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block-mb", type=int, default=256)
    parser.add_argument("--max-baseline-gb", type=float, default=2.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--model-config", default="ctclip_small")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    print(machine_state(), flush=True)
    results = {}
    for part in args.parts:
        print(f"\n## {part}", flush=True)
        results[part] = PARTS[part](args)
    print(f"\n{machine_state()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
