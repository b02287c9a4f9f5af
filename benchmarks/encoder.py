"""Full-size CT-CLIP v2 image encoder on CPU: our eval path against the reference-semantics path.

Usage::

    .venv/bin/python benchmarks/encoder.py [--repeats 1] [--config ctclip_v2] [--full-reference-prompts]

Both paths are the same classes with the same seeded random weights. For outputs and peak RSS each path
runs in its own child process (so that each peak RSS is its own); for timing, a third child alternates the
two paths on one model in ABBA order, so that the fluctuating load of a shared machine hits both alike:

* ``reference``: the reference's computation: explicit ``softmax(q k^T)`` attention, the spatial position bias
  evaluated for every token pair on every forward, the unchunked codebook lookup, the whole volume patchified
  at once, and the two unused ``*_extra`` projections held in memory (605 MB), as the reference CTCLIP holds them.
* ``ours``: fused attention, the bias evaluated per distinct offset and cached in eval, chunked VQ lookup and
  patch embedding, ``*_extra`` not held.

Each memory child builds the zero-shot-ready full model (CTViT + CXR-BERT-sized BERT + projections), encodes
a 1x1x240x480x480 volume, computes the 18 zero-shot probabilities (prompts tokenized with the local WordPiece
vocabulary: CXR-BERT's cannot be downloaded here) and reports its peak RSS. The parent compares the outputs and prints
the ratios. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from memory import rss_mb  # benchmarks/ is on sys.path when a script runs


def build(path: str, config: str):
    import custom_nets as cn
    import torch

    torch.manual_seed(0)
    if path == "reference":
        model = cn.create_model(config, ctvit={"reference_semantics": True}, ctclip={"keep_reference_extras": True})
    else:
        model = cn.create_model(config)
    return model.eval()


def make_volume(config: str):
    import custom_nets as cn
    import torch

    g = torch.Generator().manual_seed(1)
    _, d, h, w = cn.image_input_shape(config)
    return torch.rand(1, 1, d, h, w, generator=g).mul_(2).sub_(1)  # the model's [-1, 1] window, one copy


def encode(model, volume):
    import torch

    tokens = model.visual_transformer(volume, return_encoded_tokens=True)
    pooled = tokens.mean(dim=1).reshape(1, -1)
    return tokens, torch.nn.functional.normalize(model.to_visual_latent(pooled), dim=-1)


def timing_worker(repeats: int, config: str) -> None:
    """One model, the two execution paths alternated ABBA (same weights, same load conditions)."""
    import torch

    model = build("ours", config)
    volume = make_volume(config)
    times = {"reference": [], "ours": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for path in ("reference", "ours", "ours", "reference"):
                model.visual_transformer.set_options(reference_semantics=path == "reference")
                t = time.perf_counter()
                encode(model, volume)
                times[path].append(time.perf_counter() - t)
    print(json.dumps({"path": "timing", "encode_image_s": times, "threads": torch.get_num_threads()}))


def worker(path: str, out: str, config: str, full_reference_prompts: bool) -> None:
    import torch

    import custom_nets as cn

    t0 = time.perf_counter()
    model = build(path, config)
    build_s = time.perf_counter() - t0
    rss_model = rss_mb()
    checksum = float(model.to_visual_latent.weight[:4].double().sum())
    volume = make_volume(config)
    with torch.inference_mode():
        t = time.perf_counter()
        tokens, image_latents = encode(model, volume)
        encode_s = time.perf_counter() - t
        pre_vq = model.visual_transformer.encode(model.visual_transformer.patch_embed(volume))
        indices = model.visual_transformer.vq._codebook.lookup(pre_vq.reshape(-1, pre_vq.shape[-1]))

        tokenizer = cn.build_tokenizer("ctclip_tiny")  # local WordPiece (CXR-BERT's vocabulary is not available)
        t = time.perf_counter()
        if path == "reference":
            # the reference script: per pathology, one prompt pair (padded to 512 tokens with
            # --full-reference-prompts, as the reference does; 36 x 512 tokens through BERT-base is minutes)
            from transforms import CTRATE_PATHOLOGIES

            probs = []
            for name in CTRATE_PATHOLOGIES:
                tok = tokenizer([f"{name} is present.", f"{name} is not present."],
                                padding="max_length" if full_reference_prompts else "longest",
                                truncation=True, max_length=512, return_tensors="pt")
                text = model.encode_text(tok["input_ids"], tok["attention_mask"])
                probs.append(((text * image_latents).sum(-1) * model.temperature.exp()).softmax(0)[0])
            probs = torch.stack(probs)[None]
        else:
            zs = cn.ZeroShotClassifier(model, tokenizer)
            probs = zs.probabilities(image_latents)
        text_s = time.perf_counter() - t
    torch.save({"tokens": tokens, "pre_vq": pre_vq, "indices": indices, "image_latents": image_latents,
                "probs": probs}, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"path": path, "build_s": build_s, "encode_image_s": encode_s, "zero_shot_text_s": text_s,
                      "rss_after_build_mb": rss_model, "peak_rss_mb": peak, "weight_checksum": checksum}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="ABBA rounds of the timing comparison")
    parser.add_argument("--config", default="ctclip_v2")
    parser.add_argument("--full-reference-prompts", action="store_true",
                        help="pad the reference path's prompts to 512 tokens like the reference script")
    parser.add_argument("--worker", choices=["reference", "ours", "timing"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker == "timing":
        return timing_worker(args.repeats, args.config)
    if args.worker:
        return worker(args.worker, args.out, args.config, args.full_reference_prompts)

    import torch

    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("reference", "ours", "timing"):
            out = os.path.join(tmp, f"{path}.pt")
            cmd = [sys.executable, __file__, "--worker", path, "--out", out, "--repeats", str(args.repeats),
                   "--config", args.config] + (["--full-reference-prompts"] if args.full_reference_prompts else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                sys.exit(f"{path} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[path] = json.loads(lines[-1])
            if path != "timing":
                outputs[path] = torch.load(out, weights_only=True)
            print(f"{path:9s}", json.dumps(results[path]), flush=True)

    ref, ours = outputs["reference"], outputs["ours"]
    assert results["reference"]["weight_checksum"] == results["ours"]["weight_checksum"], "weights differ"

    def maxdiff(key):
        return (ref[key].double() - ours[key].double()).abs().max().item()

    flips = int((ref["indices"] != ours["indices"]).sum())
    print(f"config {args.config}, {tuple(ref['tokens'].shape[1:4])} tokens per volume, "
          f"threads {results['timing']['threads']}, load average {os.getloadavg()[0]:.1f}")
    print(f"max |diff| pre-VQ tokens {maxdiff('pre_vq'):.2e}, VQ indices differing {flips}/{ref['indices'].numel()}, "
          f"encoded tokens {maxdiff('tokens'):.2e}, image latents {maxdiff('image_latents'):.2e}, "
          f"zero-shot probabilities {maxdiff('probs'):.2e}")
    print("outputs equal within 1e-4:", maxdiff("image_latents") <= 1e-4 and maxdiff("probs") <= 1e-4)
    rt, ot = results["timing"]["encode_image_s"]["reference"], results["timing"]["encode_image_s"]["ours"]
    print("encode_image seconds per pass (same process, ABBA order): reference " + ", ".join(f"{t:.1f}" for t in rt)
          + "; ours " + ", ".join(f"{t:.1f}" for t in ot))
    print(f"speed-up (sum of passes) {sum(rt) / sum(ot):.2f}x, best pass vs best pass {min(rt) / min(ot):.2f}x")
    print(f"separate processes, one pass each: reference {results['reference']['encode_image_s']:.1f} s, "
          f"ours {results['ours']['encode_image_s']:.1f} s")
    print(f"zero-shot text part (36 prompts{', reference padded to 512' if args.full_reference_prompts else ''}): "
          f"reference {results['reference']['zero_shot_text_s']:.1f} s, ours {results['ours']['zero_shot_text_s']:.1f} s")
    print(f"peak RSS: reference {results['reference']['peak_rss_mb'] / 1024:.2f} GB, ours "
          f"{results['ours']['peak_rss_mb'] / 1024:.2f} GB (after building the model: "
          f"{results['reference']['rss_after_build_mb'] / 1024:.2f} / {results['ours']['rss_after_build_mb'] / 1024:.2f} GB)")


if __name__ == "__main__":
    main()
