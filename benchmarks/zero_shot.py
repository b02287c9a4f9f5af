"""Zero-shot inference: the reference procedure against ours, in one process, on the full-size CT-CLIP v2.

The reference (``scripts/zero_shot.py`` of CT-CLIP) runs, for each of the 18 pathologies, one full
``CTCLIP.forward`` with the prompt pair ``["{p} is present.", "{p} is not present."]`` tokenised with
``padding="max_length", max_length=512``, so every volume is encoded 18 times; ``P(present)`` is the
softmax of the two logits. Ours (:class:`custom_nets.ZeroShotClassifier`) encodes the 36 prompts once
(padded to the longest prompt) and each volume once. Both use the same model object (our CTCLIP,
``model.reference_forward`` for the reference procedure), random weights (seeded), eval mode, no grad.

Printed: both wall times, the speed-up, the per-volume latency of ours once prompts are cached, the peak
RSS of each phase (``VmHWM``, reset between phases through ``/proc/self/clear_refs``), the largest
probability difference (must be <= 1e-5), and each against the floor: the image forward's FLOPs (counted on the
meta device) at the fp32 matmul rate measured at the end of the run.

Run: ``python benchmarks/zero_shot.py`` (about 5 minutes on 2 CPU cores; ~6 GB RAM). ``--size small`` runs
the same comparison on the ctclip_small architecture in seconds (a smoke run, not the benchmark).
No download: the text encoder is built from the CXR-BERT config in ``ctclip_v2.json`` with random weights
and the prompts are tokenised with the local chest-CT WordPiece vocabulary (ids differ from CXR-BERT's,
which does not matter for random weights).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from memory import matmul_rate, peak_rss_mb as _peak_rss_mb, reset_peak_rss as _reset_peak_rss  # benchmarks/ on sys.path


def reference_procedure(model, tokenizer, volume, pathologies, max_length: int = 512) -> torch.Tensor:
    """The reference zero-shot loop: one full forward (image re-encoded) per pathology."""
    probs = []
    for name in pathologies:
        tok = tokenizer([f"{name} is present.", f"{name} is not present."], padding="max_length",
                        truncation=True, max_length=max_length, return_tensors="pt")
        logits = model.reference_forward(tok["input_ids"].to(volume.device), volume,
                                         text_attention_mask=tok["attention_mask"].to(volume.device))
        probs.append(logits.softmax(dim=0)[0])
    return torch.stack(probs).unsqueeze(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("v2", "small"), default="v2",
                        help="v2: the published architecture at 480x480x240 (the benchmark); small: smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from custom_nets import ZeroShotClassifier, create_model, image_input_shape
    from custom_nets.text_encoder import build_tokenizer
    from transforms import CTRATE_PATHOLOGIES

    config = "ctclip_v2" if args.size == "v2" else "ctclip_small"
    overrides = {}
    if args.size == "small":  # no pretrained MiniLM needed for a smoke run: a random BERT of its size
        overrides = {"text_encoder": {"load_pretrained_weights": False, "tokenizer": "builtin:wordpiece",
                                      "bert_config": {"vocab_size": 1024, "hidden_size": 384, "num_hidden_layers": 6,
                                                      "num_attention_heads": 12, "intermediate_size": 1536,
                                                      "max_position_embeddings": 512}}}
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = create_model(config, **overrides).eval()
    build_s = time.perf_counter() - t0
    max_length = model.config["text"]["max_length"]
    tokenizer = build_tokenizer({"tokenizer": "builtin:wordpiece"})  # offline stand-in for the CXR-BERT vocabulary
    shape = (1,) + image_input_shape(model.config)
    gen = torch.Generator().manual_seed(args.seed + 1)
    volume = (torch.randn(shape, generator=gen) * 0.5).clamp(-1, 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {config}: {n_params / 1e6:.1f} M parameters held, built in {build_s:.1f} s; volume {tuple(shape)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")

    with torch.no_grad():
        # ours, cold: prompt encoding included (a fresh classifier has no cached prompt latents)
        classifier = ZeroShotClassifier(model, tokenizer, CTRATE_PATHOLOGIES, max_length=max_length)
        _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        ours = classifier(volume)
        ours_cold_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
        ours_peak = _peak_rss_mb()
        print(f"ours (prompts + image encoded once): {ours_cold_s:.1f} s, peak RSS {ours_peak:.0f} MB", flush=True)

        _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        ref = reference_procedure(model, tokenizer, volume, CTRATE_PATHOLOGIES, max_length)
        ref_s, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
        ref_peak = _peak_rss_mb()
        print(f"reference procedure (18 forwards, prompt pairs padded to {max_length}): {ref_s:.1f} s, "
              f"peak RSS {ref_peak:.0f} MB", flush=True)

        # ours, warm: what each further volume costs once the prompts are cached
        t0 = time.perf_counter()
        ours_again = classifier(volume)
        ours_warm_s = time.perf_counter() - t0

    from gpu import count_flops  # benchmarks/gpu.py: FLOPs counted on the meta device, no compute

    image_flops = count_flops(config, 1, 1)["image_forward"]
    rate = matmul_rate()
    floor_s = image_flops / rate
    diff = float((ours - ref).abs().max())
    repeat = float((ours - ours_again).abs().max())
    speedup = ref_s / ours_cold_s
    print()
    print(f"max |P_ours - P_reference| = {diff:.2e} (tolerance 1e-5); ours run twice differs by {repeat:.1e}")
    print(f"speed-up, one volume, prompts included: {speedup:.1f}x  ({ref_s:.1f} s -> {ours_cold_s:.1f} s)")
    print(f"per-volume latency: reference {ref_s:.1f} s, ours {ours_warm_s:.1f} s with cached prompts "
          f"({ref_s / ours_warm_s:.1f}x)")
    print(f"CPU time (less sensitive to other load on the machine): reference {ref_cpu:.0f} s, ours {ours_cpu:.0f} s "
          f"({ref_cpu / ours_cpu:.1f}x); load average at the end {os.getloadavg()[0]:.1f}")
    print(f"peak RSS: ours {ours_peak:.0f} MB, reference {ref_peak:.0f} MB")
    print(f"floor: the image forward's {image_flops / 1e12:.3f} TFLOP at the fp32 matmul rate {rate / 1e9:.0f} GFLOP/s = "
          f"{floor_s:.2f} s; ours {ours_warm_s / floor_s:.2f}x the floor per volume with cached prompts, "
          f"{ours_cold_s / floor_s:.2f}x with the prompts; the reference {ref_s / floor_s:.1f}x")
    ok = diff <= 1e-5
    if not ok:
        print("FAIL: probabilities differ by more than 1e-5", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
