"""Training step and zero-shot inference of every registered image encoder, on a GPU at full size (or on the CPU at
reduced size, the suite's smoke test), against the FLOP floor and the reference zero-shot procedure, in one run.

Usage::

    .venv/bin/python benchmarks/gpu.py                        # a GPU if there is one: full size; else reduced, CPU
    .venv/bin/python benchmarks/gpu.py --device cuda --size full [--batches 1 2 4 8] [--steps 3] [--json out.json]
    .venv/bin/python benchmarks/gpu.py --flops-only --size full   # FLOP counts and GPU estimates, no compute

For each registered image encoder (its full-size and reduced model config in :data:`ENCODER_CONFIGS`), with seeded
random weights (no download):

* training step (the pretraining bundle's network, :class:`~custom_nets.pretraining.PretrainingNetwork`, with the
  CLIP loss and AdamW; forward, loss, backward, optimizer step) at each batch size, in ``--dtype`` autocast
  (bfloat16 by default), without and with activation checkpointing: samples/s (best step of ``--steps`` after one
  warm-up) and peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of the process); a batch that does not
  fit is reported as ``OOM`` and the larger ones are skipped;
* zero-shot inference (:class:`~custom_nets.ZeroShotClassifier`, 18 findings, prompts cached): volumes/s, exact
  (float32) and in ``--dtype`` autocast, and the number of image-encoder passes per volume (must be 1); the
  reference procedure (one full forward per finding with prompt pairs padded to the model's max length) at one
  volume is the baseline;
* the floor: FLOPs of one step (forward + backward, counted by ``FlopCounterMode`` on the meta device: no compute)
  divided by the device's matmul rate in ``--dtype`` measured in the same run; each figure's ratio to it.

Without a GPU, ``--flops-only --size full`` gives the FLOPs per training sample and per zero-shot volume at full
size and the time they would take at ``--estimate-tflops`` (default: 40% of an H100 SXM's 989 dense bf16 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from memory import flop_counter, machine_state, matmul_rate, peak_rss_mb, reset_peak_rss, rss_mb, timed

# registered encoder type -> (full-size config, reduced config for the CPU smoke run)
ENCODER_CONFIGS = {"ctvit": ("ctclip_v2", "ctclip_tiny"),
                   "slice_fusion": ("slicefusion_dinov2_base", "slicefusion_tiny")}
H100_BF16_DENSE_TFLOPS = 989.0


def encoder_configs(size: str) -> dict[str, str]:
    """``{encoder type: model config}`` for every registered image encoder at ``size`` ("full" or "reduced"): the
    configs of :data:`ENCODER_CONFIGS`, else among the shipped model configs of that type the one with the largest
    (full) or smallest (reduced) input volume.

    Raises:
        KeyError: naming a registered encoder that no shipped model config uses.
    """
    from ctclip_contract import list_model_configs, load_model_config
    from custom_nets.image_encoders import IMAGE_ENCODERS

    out = {}
    for kind in sorted(IMAGE_ENCODERS):
        if kind in ENCODER_CONFIGS:
            out[kind] = ENCODER_CONFIGS[kind][0 if size == "full" else 1]
            continue
        shipped = [(math.prod(load_model_config(n).input.spatial_size), n) for n in list_model_configs()
                   if load_model_config(n).image_encoder[0] == kind]
        if not shipped:
            raise KeyError(f"benchmarks/gpu.py: no shipped model config uses the registered image encoder {kind!r}; "
                           "add its full-size and reduced configs to ENCODER_CONFIGS")
        out[kind] = (max if size == "full" else min)(shipped)[1]
    return out


def no_download(config: str) -> dict:
    """Overrides that keep every pretrained part of a config as architecture only (random weights, offline)."""
    from ctclip_contract import load_model_config

    cfg = load_model_config(config)
    overrides = {}
    if cfg.image_encoder[0] == "slice_fusion":
        overrides["image_encoder"] = {"backbone": {"load_pretrained_weights": False}}
    if cfg["text_encoder"].get("load_pretrained_weights"):
        overrides["text_encoder"] = {"load_pretrained_weights": False, "tokenizer": "builtin:wordpiece",
                                     "bert_config": {"vocab_size": 1024, "hidden_size": cfg["ctclip"]["dim_text"],
                                                     "num_hidden_layers": 6, "num_attention_heads": 12,
                                                     "intermediate_size": 4 * cfg["ctclip"]["dim_text"],
                                                     "max_position_embeddings": 512}}
    return overrides


def random_reports(model, batch: int, tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of ``batch`` random reports of ``tokens`` real tokens, padded to the model's max length
    (one row per report; ``(B, S, L)`` sentences of ``tokens`` tokens for a ``sentence_mean`` model)."""
    text = model.config.text
    vocab = model.text_transformer.get_input_embeddings().weight.shape[0]
    n = min(tokens, text.max_length)
    if model.text_pooling == "sentence_mean":
        rows = text.max_sentences or 16
        ids = torch.zeros(batch, rows, text.max_length, dtype=torch.long)
        ids[:, :min(4, rows), :n] = torch.randint(min(1000, vocab - 1), vocab, (batch, min(4, rows), n),
                                                  generator=generator)
    else:
        ids = torch.zeros(batch, text.max_length, dtype=torch.long)
        ids[:, :n] = torch.randint(min(1000, vocab - 1), vocab, (batch, n), generator=generator)
    return ids, (ids != 0).long()


def count_flops(config: str, batch: int, text_tokens: int) -> dict:
    """FLOPs of one training step (forward + backward of the image and text encoders and projections) and of one
    zero-shot volume (image forward), counted on the meta device (nothing is computed or allocated), or on the CPU
    for a config that cannot be built there (keep those small)."""
    import torch.nn.functional as F

    import custom_nets as cn

    device = "meta"
    try:
        with torch.device("meta"):
            model = cn.create_model(config, **no_download(config))
    except RuntimeError:  # a config whose construction reads a tensor's values (HU band edges): count on CPU
        device = "cpu"
        model = cn.create_model(config, **no_download(config))
    model.train()
    codebook = getattr(getattr(model.visual_transformer, "vq", None), "_codebook", None)
    if codebook is not None:
        codebook.eval()  # its EMA update (bincount) has no meta kernel and no FLOPs worth counting
    volume = torch.zeros((batch,) + cn.image_input_shape(model.config), device=device)
    ids = torch.ones(batch, min(text_tokens, model.config.text.max_length), dtype=torch.long, device=device)
    counter = flop_counter()
    with counter:
        image = model.encode_image(volume)
        image_forward = counter.get_total_flops()
        # all tokens real (no mask: the attention-mask preparation looks at the data, which meta tensors lack)
        text = F.normalize(model.to_text_latent(model.pool_text(model.encode_text_tokens(ids).float(),
                                                                torch.ones_like(ids))), dim=-1)
        (image @ text.t()).logsumexp(-1).sum().backward()
    return {"train_step": counter.get_total_flops(), "image_forward": image_forward}


def _sync(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else None


def _reset_peak(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    reset_peak_rss()
    return rss_mb()


def _peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else peak_rss_mb()


def train_rows(model, device: str, batches, dtype: str, steps: int, text_tokens: int,
               checkpoint_settings=(False, True)) -> list[dict]:
    """Training-step rows for each batch size and each activation-checkpointing setting (``dtype`` "float32": no
    autocast)."""
    import custom_nets as cn
    from custom_nets.losses import PretrainingLoss
    from custom_nets.pretraining import PretrainingNetwork

    rows = []
    g = torch.Generator().manual_seed(1)
    shape = cn.image_input_shape(model.config)
    for checkpointing in checkpoint_settings:
        model.set_gradient_checkpointing(checkpointing)
        for batch in batches:
            if rows and rows[-1]["checkpointing"] == checkpointing and rows[-1].get("oom"):
                rows.append({"checkpointing": checkpointing, "batch": batch, "oom": True, "skipped": True})
                continue
            row = {"checkpointing": checkpointing, "batch": batch}
            loss = PretrainingLoss()
            net = PretrainingNetwork(model, loss, autocast_dtype=None if dtype == "float32" else dtype).to(device)
            net.train()
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
            image = (torch.rand((batch,) + shape, generator=g) * 2 - 1).to(device)
            ids, mask = (t.to(device) for t in random_reports(model, batch, text_tokens, g))

            def step():
                opt.zero_grad(set_to_none=True)
                loss(net(image, ids, mask)).backward()
                opt.step()

            try:
                base = _reset_peak(device)
                times = timed(step, repeats=steps, warmup=1, sync=_sync(device))
                row.update(step_s=min(times), samples_per_s=batch / min(times), peak_mb=_peak(device),
                           peak_above_start_mb=_peak(device) - base)
            except torch.OutOfMemoryError:
                row["oom"] = True
            finally:
                del opt, net
                model.zero_grad(set_to_none=True)
            rows.append(row)
    model.set_gradient_checkpointing(False)
    model.autocast_dtype = None
    return rows


def zero_shot_rows(model, device: str, dtype: str, batch: int, repeats: int) -> list[dict]:
    """Zero-shot volumes/s (exact, then ``dtype`` autocast) with the image-encoder passes per volume, and the
    reference procedure at one volume as the baseline."""
    import custom_nets as cn
    from custom_nets.text_encoder import build_tokenizer
    from transforms import CTRATE_PATHOLOGIES

    from zero_shot import reference_procedure  # benchmarks/zero_shot.py

    model.eval()
    tokenizer = build_tokenizer({"tokenizer": "builtin:wordpiece"})  # offline stand-in for the model's vocabulary
    max_length = model.config.text.max_length
    classifier = cn.ZeroShotClassifier(model, tokenizer, CTRATE_PATHOLOGIES, max_length=max_length)
    g = torch.Generator().manual_seed(2)
    volumes = (torch.rand((batch,) + cn.image_input_shape(model.config), generator=g) * 2 - 1).to(device)
    passes = {"calls": 0, "volumes": 0}
    encoder = model.visual_transformer
    encode_volume = encoder.encode_volume  # every encoder's entry point (CTCLIP.image_encoding calls it)

    def counted(image, *args, **kwargs):
        passes["calls"] += 1
        passes["volumes"] += image.shape[0]
        return encode_volume(image, *args, **kwargs)

    encoder.encode_volume = counted
    rows = []
    try:
        with torch.inference_mode():
            for name, autocast in (("exact", None), (dtype, dtype)):
                if name == "float32" and autocast:
                    continue
                model.autocast_dtype = getattr(torch, autocast) if autocast else None
                classifier.prompt_latents()  # prompts encoded once, outside the timing
                passes.update(calls=0, volumes=0)
                base = _reset_peak(device)
                times = timed(lambda: classifier(volumes), repeats=repeats, warmup=1, sync=_sync(device))
                rows.append({"path": f"ours, {name}", "batch": batch, "volumes_per_s": batch / min(times),
                             "image_passes_per_volume": passes["volumes"] / ((repeats + 1) * batch),
                             "encoder_calls": passes["calls"], "peak_above_start_mb": _peak(device) - base})
            model.autocast_dtype = None
            passes.update(calls=0, volumes=0)
            one = volumes[:1]
            times = timed(lambda: reference_procedure(model, tokenizer, one, CTRATE_PATHOLOGIES, max_length),
                          repeats=1, warmup=0, sync=_sync(device))
            rows.append({"path": "reference procedure, exact", "batch": 1, "volumes_per_s": 1 / min(times),
                         "image_passes_per_volume": passes["volumes"], "encoder_calls": passes["calls"]})
    finally:
        del encoder.encode_volume  # the class's method again
        model.autocast_dtype = None
    return rows


def run(args) -> dict:
    import custom_nets as cn

    device = args.device
    dtype = getattr(torch, args.dtype)
    configs = encoder_configs(args.size)
    if args.encoders:
        unknown = sorted(set(args.encoders) - set(configs))
        if unknown:
            raise SystemExit(f"--encoders {unknown}: not registered; registered: {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in args.encoders}
    report = {"device": device, "size": args.size, "dtype": args.dtype, "encoders": {}}
    if device.startswith("cuda"):
        report["card"] = torch.cuda.get_device_name(device)
    if not args.flops_only:
        n = 8192 if device.startswith("cuda") else 1024
        report["matmul_flops_per_s"] = matmul_rate(dtype, n=n, device=device)
    report["machine"] = machine_state()
    print(f"device {device} ({report.get('card', 'CPU')}), size {args.size}, {args.dtype} autocast; "
          + (f"{args.dtype} matmul rate {report['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s; "
             if "matmul_flops_per_s" in report else "") + report["machine"], flush=True)
    for kind, config in configs.items():
        try:
            flops = {b: count_flops(config, b, args.text_tokens) for b in args.batches}
        except Exception as err:
            report["encoders"][kind] = {"config": config, "error": f"FLOP count: {type(err).__name__}: {err}"}
            print(f"FAILED {kind} ({config}): {report['encoders'][kind]['error']}", file=sys.stderr, flush=True)
            continue
        entry = {"config": config, "flops": {str(b): f for b, f in flops.items()}}
        per_sample = flops[args.batches[0]]["train_step"] / args.batches[0]
        per_volume = flops[args.batches[0]]["image_forward"] / args.batches[0]
        rate = args.estimate_tflops * 1e12
        print(f"\n{kind} ({config}): {per_sample / 1e9:.4g} GFLOP per training sample (forward + backward), "
              f"{per_volume / 1e9:.4g} GFLOP per zero-shot volume; at {args.estimate_tflops:.0f} TFLOP/s: "
              f"{rate / per_sample:.1f} samples/s, {rate / per_volume:.1f} volumes/s", flush=True)
        entry["estimate"] = {"tflops": args.estimate_tflops, "samples_per_s": rate / per_sample,
                             "volumes_per_s": rate / per_volume}
        report["encoders"][kind] = entry
        if args.flops_only:
            continue
        torch.manual_seed(0)
        try:
            model = cn.create_model(config, **no_download(config)).to(device)
            entry["train"] = train_rows(model, device, args.batches, args.dtype, args.steps, args.text_tokens)
            entry["zero_shot"] = zero_shot_rows(model, device, args.dtype, args.zero_shot_batch, args.steps)
        except Exception as err:  # one encoder that cannot run here must not hide the others' figures
            entry["error"] = f"{type(err).__name__}: {err}"
            print(f"FAILED {kind} ({config}): {entry['error']}", file=sys.stderr, flush=True)
            continue
        rate = report["matmul_flops_per_s"]
        print("| checkpointing | batch | samples/s | peak MB | above start MB | floor s | step / floor |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in entry["train"]:
            if r.get("oom"):
                print(f"| {r['checkpointing']} | {r['batch']} | {'skipped' if r.get('skipped') else 'OOM'} | | | | |")
                continue
            floor = flops[r["batch"]]["train_step"] / rate
            r["floor_s"], r["ratio_to_floor"] = floor, r["step_s"] / floor
            print(f"| {r['checkpointing']} | {r['batch']} | {r['samples_per_s']:.3g} | {r['peak_mb']:.0f} | "
                  f"{r['peak_above_start_mb']:.0f} | {floor:.3g} | {r['ratio_to_floor']:.1f}x |")
        ref = entry["zero_shot"][-1]["volumes_per_s"]
        floor = per_volume / rate
        print("| zero-shot path | volumes/s | image passes per volume | vs reference | 1 / floor volumes/s |")
        print("|---|---:|---:|---:|---:|")
        for r in entry["zero_shot"]:
            r["speedup_vs_reference"] = r["volumes_per_s"] / ref
            print(f"| {r['path']} | {r['volumes_per_s']:.3g} | {r['image_passes_per_volume']:g} | "
                  f"{r['speedup_vs_reference']:.1f}x | {1 / floor:.3g} |", flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report["machine_end"] = machine_state()
    print(f"\n{report['machine_end']}")
    failed = sorted(k for k, e in report["encoders"].items() if "error" in e)
    if failed:
        print(f"encoders that did not run: {failed}", file=sys.stderr)
    return report


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--size", choices=("full", "reduced"), default="full" if cuda else "reduced")
    parser.add_argument("--encoders", nargs="+", help="registered encoder types to run (default: all)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (best reported) after one warm-up")
    parser.add_argument("--text-tokens", type=int, default=160, help="real tokens per random report")
    parser.add_argument("--zero-shot-batch", type=int, default=2)
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs and print the estimate only")
    parser.add_argument("--estimate-tflops", type=float, default=0.4 * H100_BF16_DENSE_TFLOPS,
                        help="sustained TFLOP/s assumed for the estimate (default: 40%% of an H100's bf16 peak)")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 1 if any("error" in e for e in report["encoders"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
