"""How cost grows with the work: preprocessing against volumes and workers, zero-shot against the number of prompts,
retrieval against the gallery size, a training step against the batch size; each against its baseline and floor.

Usage::

    .venv/bin/python benchmarks/scaling.py [--parts preprocess zero_shot retrieval train] [--only retrieval]
        [--cohort DIR] [--volumes 4 8 16] [--workers 0 1 2] [--classes 18 36 72 144]
        [--gallery 1000 10000 50000] [--batches 1 2 4 8] [--model-config ctclip_small]

* ``preprocess``: :class:`workflows.preprocess_cohort.CTPreprocessor` (``ctclip_tiny`` contract) on the first N
  patients of a raw cohort (``--cohort``; default: a tiny generated one), with 0, 1, 2 workers: seconds and
  volumes/s; the ratio to N times the single-volume cost of the smallest run (linear scaling) and the
  speed-up over 0 workers.
* ``zero_shot``: :class:`custom_nets.ZeroShotClassifier` on one volume with 18 .. 144 classes (2 prompts each), prompts
  encoded cold: seconds, image-encoder passes (must stay 1), prompt-encoding share; the baseline is the
  reference's one image pass per class, priced at the measured image-pass time.
* ``retrieval``: :func:`workflows.retrieval.retrieval_metrics` on N volume and N report latents (512-d) with 18
  labels (both directions, volume→volume mAP@1..50, alignment and uniformity), its similarities by blocks of rows
  that fit ``--block-mb``, against :func:`full_matrix_retrieval_metrics` (the same metrics as they were computed
  before, from float64 N x N matrices) where the N x N matrix fits in ``--max-baseline-gb``; both give the same
  results (the largest difference is printed). The floor is the products' FLOPs (``6 N^2 d`` ours: one pass for
  both directions, one for volume→volume, half of one per uniformity; ``8 N^2 d`` the baseline) at the measured
  numpy float64 matmul rate; peak RSS above the start of each.
* ``train``: one training step of the pretraining network (:func:`gpu.train_rows`, CPU float32) at each batch
  size: samples/s, peak RSS, and the ratio to the FLOP floor.

Every figure is printed with the load average. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memory import machine_state, matmul_rate, peak_rss_mb, reset_peak_rss, rss_mb, timed


def full_matrix_retrieval_metrics(image_latents: np.ndarray, text_latents: np.ndarray, labels: np.ndarray,
                                  ks=(1, 5, 10, 50, 100), map_ks=(1, 5, 10, 50), relevance: str = "exact") -> dict:
    """The baseline: :func:`workflows.retrieval.retrieval_metrics` as it was computed before it went by blocks
    (e2fb669), from whole matrices: the float64 volume x report similarity, an N x N x C label comparison and the
    N x N relevance, the volume x volume similarity with a stable argsort of every row per mAP cut-off, and each
    uniformity's N x N distances and their upper triangle. The rank formulas are the library's (the same)."""
    from workflows.metrics import to_jsonable
    from workflows.retrieval import _l2_normalize, _rank_metrics

    img, txt = _l2_normalize(np.asarray(image_latents, np.float64)), _l2_normalize(np.asarray(text_latents, np.float64))
    n = img.shape[0]

    def ranks(sim):
        match = np.diag(sim)[:, None]
        return (sim > match).sum(axis=1), (sim == match).sum(axis=1)

    def uniformity(a, t=2.0):
        sq = np.maximum(2.0 - 2.0 * (a @ a.T), 0.0)
        v = -t * sq[np.triu_indices(n, k=1)]
        m = v.max()
        return float(m + np.log(np.mean(np.exp(v - m))))

    sim = img @ txt.T
    out = {"n": n, "report_to_volume": _rank_metrics(*ranks(sim.T), ks),
           "volume_to_report": _rank_metrics(*ranks(sim), ks)}
    del sim
    out["embedding"] = {"alignment": float((np.linalg.norm(img - txt, axis=1) ** 2).mean()),
                        "uniformity_image": uniformity(img), "uniformity_text": uniformity(txt)}
    y = np.asarray(labels).astype(bool)
    rel = (y[:, None, :] == y[None, :, :]).all(axis=2) if relevance == "exact" else (y.astype(np.int64) @ y.T) > 0
    np.fill_diagonal(rel, False)
    vv_sim = img @ img.copy().T
    n_rel = rel.sum(axis=1)
    used = n_rel > 0
    vv = {"relevance": relevance}
    for k in map_ks:
        sim_k = np.array(vv_sim)  # a copy per cut-off with the query left out, as mean_average_precision_at_k made
        np.fill_diagonal(sim_k, -np.inf)
        order = np.argsort(-sim_k, axis=1, kind="stable")[:, : min(k, n - 1)]
        del sim_k
        hits = np.take_along_axis(rel, order, axis=1).astype(np.float64)
        precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
        ap = (precision_at_i * hits).sum(axis=1)[used] / np.minimum(k, n_rel[used])
        vv[f"map@{k}"], vv["n_queries"] = float(ap.mean()), int(used.sum())
    vv["random_precision"] = float(rel.sum() / (n * (n - 1)))
    out["volume_to_volume"] = vv
    out["notes"] = [f"recall@k with k >= N={n} is 1 by construction"] if any(k >= n for k in ks) else []
    return to_jsonable(out)


def largest_difference(a, b, path: str = "") -> tuple[float, str]:
    """The largest absolute difference between two results' numbers, and where (both must have the same keys)."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"{path or 'results'}: keys differ")
        return max((largest_difference(a[k], b[k], f"{path}/{k}") for k in a), default=(0.0, ""))
    if isinstance(a, (int, float)) and not isinstance(a, bool) and a is not None and b is not None:
        return abs(float(a) - float(b)), path
    return (0.0, "") if a == b else (float("inf"), path)


def numpy_matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of an ``n x n`` float64 numpy product: the BLAS the retrieval metrics use."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    return 2 * n ** 3 / min(timed(lambda: a @ b, repeats=repeats, warmup=1))


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
    from workflows.retrieval import retrieval_metrics

    rate = numpy_matmul_rate()
    rows = []
    for n in args.gallery:
        rng = np.random.default_rng(n)
        img = rng.normal(size=(n, args.dim))
        txt = img + 6 * rng.normal(size=(n, args.dim))  # reports loosely paired: the matches' ranks spread out
        labels = rng.random((n, 18)) < 0.1  # 18 findings at 10% each: 15% of the scans normal
        base_rss = rss_mb()
        reset_peak_rss()
        t0 = time.perf_counter()
        ours = retrieval_metrics(img, txt, labels=labels, block_bytes=args.block_mb * 2 ** 20)
        ours_s = time.perf_counter() - t0
        row = {"gallery": n, "ours_s": ours_s, "ours_peak_mb": peak_rss_mb() - base_rss,
               "floor_s": 6 * n * n * args.dim / rate, "baseline_matrix_gb": n * n * 8 / 2 ** 30,
               "recall@10": ours["report_to_volume"]["recall@10"], "map@10": ours["volume_to_volume"]["map@10"]}
        if row["baseline_matrix_gb"] <= args.max_baseline_gb:
            reset_peak_rss()
            t0 = time.perf_counter()
            ref = full_matrix_retrieval_metrics(img, txt, labels)
            row.update(baseline_s=time.perf_counter() - t0, baseline_peak_mb=peak_rss_mb() - base_rss,
                       baseline_floor_s=8 * n * n * args.dim / rate)
            row["largest_difference"], row["where"] = largest_difference(ref, ours)
        row["load"] = machine_state()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nretrieval_metrics, {args.dim}-d latents, 18 labels, block {args.block_mb} MB; "
          f"float64 matmul (numpy) {rate / 1e9:.0f} GFLOP/s")
    print("| gallery N | ours s | ours peak MB | floor s | ours / floor | full matrix (float64) | baseline s | "
          "baseline peak MB | baseline / ours | largest difference |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = (f"{r['baseline_s']:.2f} | {r['baseline_peak_mb']:.0f} | {r['baseline_s'] / r['ours_s']:.1f}x | "
                f"{r['largest_difference']:.1e}" + (f" ({r['where']})" if r["largest_difference"] else "")
                if "baseline_s" in r else "not run (does not fit) | | | ")
        print(f"| {r['gallery']:,} | {r['ours_s']:.2f} | {r['ours_peak_mb']:.0f} | {r['floor_s']:.2f} | "
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
    parser.add_argument("--parts", "--only", nargs="+", default=list(PARTS), choices=list(PARTS),
                        help="the parts to run (default all)")
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
