"""Contrastive pretraining step throughput and peak memory, with and without activation checkpointing.

Usage::

    .venv/bin/python benchmarks/pretrain.py [--config ctclip_small] [--batch-size 8] [--steps 5] [--text-tokens 160]
        [--sentences 7]

Each variant runs in its own child process (so that each peak RSS is its own): it builds the model from the
config, wraps it in the bundle's ``PretrainingNetwork`` with the CLIP loss and AdamW, runs one warm-up step,
then times ``--steps`` full training steps (forward, symmetric InfoNCE over the batch, backward, clipping,
AdamW step) on random volumes of the config's input shape and random reports of ``--text-tokens`` real tokens
padded to the config's max length (the network trims the common padding, as in training); for a config that
pools ``sentence_mean`` each report is ``--sentences`` such sentences of ``--text-tokens`` tokens. Reports samples per
second (``--text-cache``: a frozen text encoder's cache stays on, so the repeated reports are encoded once, as
in a later epoch; off by default), peak RSS of the process and the RSS growth during training (CPU), or peak CUDA memory (GPU), and the
ratios of the checkpointed variant to the plain one. Not part of the test suite; on a shared machine the
timings are noisy, so run it a few times.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from memory import rss_mb  # benchmarks/ is on sys.path when a script runs


def child(args) -> dict:
    import torch

    import custom_nets as cn
    from custom_nets.losses import PretrainingLoss
    from custom_nets.pretraining import PretrainingNetwork
    from workflows.optim import add_gradient_clipping, decay_param_groups

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    # the same reports every step: with the frozen-text cache on they would be encoded once (a later epoch)
    model = cn.create_model(args.config, ctclip={"text_cache_size": 65536 if args.text_cache else 0})
    loss = PretrainingLoss()
    net = PretrainingNetwork(model, loss, gradient_checkpointing=args.checkpointing).to(device).train()
    opt = add_gradient_clipping(torch.optim.AdamW(decay_param_groups(net, 0.05), lr=1e-4), 1.0)
    shape = cn.image_input_shape(args.config)
    max_len = model.config.get("text", {}).get("max_length", 512)
    vocab = model.text_transformer.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    image = (torch.rand((args.batch_size,) + tuple(shape), generator=g) * 2 - 1).to(device)
    n = min(args.text_tokens, max_len)
    if model.text_pooling == "sentence_mean":  # one row per sentence, as TokenizeReportd gives them
        rows = model.config["text"].get("max_sentences", 16)
        used = min(args.sentences, rows)
        ids = torch.zeros(args.batch_size, rows, max_len, dtype=torch.long)
        ids[:, :used, :n] = torch.randint(1000, vocab, (args.batch_size, used, n), generator=g)
    else:
        ids = torch.zeros(args.batch_size, max_len, dtype=torch.long)
        ids[:, :n] = torch.randint(1000, vocab, (args.batch_size, n), generator=g)
    mask = (ids != 0).long()
    ids, mask = ids.to(device), mask.to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        value = loss(net(image, ids, mask))
        value.backward()
        opt.step()
        return float(value.detach())

    rss0 = rss_mb()
    step()  # warm-up (allocator, optimizer state)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"checkpointing": args.checkpointing, "device": str(device), "batch_size": args.batch_size,
           "steps": args.steps, "seconds": seconds, "samples_per_s": args.batch_size * args.steps / seconds,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_growth_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0,
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="ctclip_small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--text-tokens", type=int, default=160)
    p.add_argument("--text-cache", action="store_true",
                   help="keep the frozen text encoder's cache on (default off: every step encodes its reports, as the first epoch does)")
    p.add_argument("--sentences", type=int, default=7)
    p.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for ckpt in (False, True):
        cmd = [sys.executable, __file__, "--child", "--config", args.config, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--text-tokens", str(args.text_tokens),
               "--sentences", str(args.sentences)] + (["--cpu"] if args.cpu else [])
        cmd += ["--text-cache"] if args.text_cache else []
        cmd += ["--checkpointing"] if ckpt else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"benchmark child failed ({'with' if ckpt else 'without'} checkpointing):\n{proc.stderr[-3000:]}")
        results["checkpointing" if ckpt else "plain"] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, ck = results["plain"], results["checkpointing"]
    print(f"config {args.config}, batch {args.batch_size}, {args.steps} timed steps, device {plain['device']}")
    print(f"{'variant':<16}{'samples/s':>10}{'peak RSS MB':>13}{'RSS growth MB':>15}" +
          (f"{'peak CUDA MB':>14}" if "peak_cuda_mb" in plain else ""))
    for name, r in results.items():
        print(f"{name:<16}{r['samples_per_s']:>10.2f}{r['peak_rss_mb']:>13.0f}{r['rss_growth_mb']:>15.0f}" +
              (f"{r['peak_cuda_mb']:>14.0f}" if "peak_cuda_mb" in r else ""))
    print(f"checkpointing/plain: speed x{ck['samples_per_s'] / plain['samples_per_s']:.2f}, "
          f"training memory growth x{ck['rss_growth_mb'] / max(plain['rss_growth_mb'], 1e-9):.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
