"""Where one zero-shot forward spends its time, against the compute floor, and what each CPU lever buys.

Usage::

    .venv/bin/python benchmarks/profile_zero_shot.py [--size v2|small] [--variants exact bf16 int8 compile]
        [--repeats 1] [--threads N] [--ops 12]

One process, one model (``ctclip_v2`` at 480x480x240 by default, seeded random weights, eval, no grad), the
zero-shot forward of :class:`custom_nets.ZeroShotClassifier` with its prompt latents re-encoded on every pass
(so the text side is counted: 36 prompts, padded to the longest). In the same run:

* the machine's fp32 (and bf16) matmul rate, best of 5 square 2048 products, at the start and (fp32) at the end
  of the run; the faster fp32 rate sets the floor; the same in FLOP per CPU-second (process time), against which
  each pass's CPU time gives a second ratio, less sensitive to other processes on the same cores;
* the FLOPs of the forward, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the first (warm-up) pass,
  CPU fused attention included (its formula is registered here), so the floor ``FLOPs / fp32 matmul rate`` is
  computed, not assumed;
* per part (patch embedding, PEG position encoding, attention with its position bias, MLP, VQ, pooling and the
  visual projection, text side, the rest), wall seconds of the best pass, measured with forward hooks on the
  modules of that part, its FLOPs and its achieved GFLOP/s;
* each variant's total, its ratio to the floor (goal: exact <= 2x) and, for an approximate variant, the largest
  probability difference from the exact path on the same volume.

Variants (applied one after the other to the same weights): ``exact`` (the default path, what the parity tests
check), ``bf16`` (``ctclip.autocast_dtype: "bfloat16"``: the model config's opt-in), ``int8`` (dynamic int8
quantisation of the image encoder's Linear layers with ``torch.ao.quantization.quantize_dynamic``: an experiment,
not a config path), ``compile`` (``torch.compile`` of the image encoder's
transformer layers; exact up to float reassociation). ``--ops N`` also prints the top N aten ops of the exact
pass (``torch.profiler``). A full-size pass takes ~20 s and ~6 GB here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
from torch import nn

from memory import flop_counter, machine_state, matmul_rate, peak_rss_mb, reset_peak_rss, timed  # benchmarks/ is on sys.path

PARTS = ("patch embedding", "PEG", "attention", "MLP", "VQ", "pooling + projection", "text side", "rest")


def named_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(part, module)`` for the modules whose forward makes up each part of a CTViT CT-CLIP's zero-shot pass."""
    vis = model.visual_transformer
    parts = [("patch embedding", vis.to_patch_emb), ("attention", vis.spatial_rel_pos_bias), ("VQ", vis.vq),
             ("pooling + projection", model.to_visual_latent), ("text side", model.text_transformer),
             ("text side", model.to_text_latent)]
    for stack in (vis.enc_spatial_transformer, vis.enc_temporal_transformer):
        for peg, attn, _, ff in stack.layers:
            parts += [("PEG", peg), ("attention", attn), ("MLP", ff)]
    return parts


class PartMeter:
    """Forward hooks that add each part's wall seconds (and FLOPs, while a flop counter runs) per pass.

    Hooks are not nested across parts (no part's module contains another part's), so the parts add up; "rest"
    is the pass's total minus their sum (reshapes, residual adds, norm_out, depth pooling, the prompt solve).
    """

    def __init__(self, model: nn.Module):
        self.seconds: dict = defaultdict(float)
        self.flops: dict = defaultdict(float)
        self.counter = None
        self._start: dict = {}
        self._handles = []
        for part, module in named_parts(model):
            self._handles.append(module.register_forward_pre_hook(self._pre(module)))
            self._handles.append(module.register_forward_hook(self._post(part, module)))

    def _total_flops(self) -> int:
        return self.counter.get_total_flops() if self.counter is not None else 0

    def _pre(self, module):
        def hook(*_):
            self._start[id(module)] = (time.perf_counter(), self._total_flops())
        return hook

    def _post(self, part, module):
        def hook(*_):
            t0, f0 = self._start.pop(id(module))
            self.seconds[part] += time.perf_counter() - t0
            self.flops[part] += self._total_flops() - f0
        return hook

    def reset(self) -> None:
        self.seconds.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def quantize_variant(model):
    # torch.ao's dynamic quantisation (deprecated in this torch, still the fbgemm/oneDNN int8 kernels): an
    # experiment here, not a config path; the weights are quantised per tensor, activations per batch
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(model.visual_transformer, {nn.Linear}, dtype=torch.qint8, inplace=True)


def compile_variant(model):
    # each transformer layer compiled on its own: the same graph for every layer of a stack, one compile per stack
    vis = model.visual_transformer
    for stack in (vis.enc_spatial_transformer, vis.enc_temporal_transformer):
        stack._layer = torch.compile(stack._layer, dynamic=False)


def cpu_matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 FLOP per CPU-second (process time, all threads) of an ``n x n`` product: less
    sensitive than the wall rate to other processes on the same cores, as is the pass's own CPU time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - c0)
    return 2 * n ** 3 / best


def run(args) -> int:
    from custom_nets import ZeroShotClassifier, create_model, image_input_shape
    from custom_nets.text_encoder import build_tokenizer
    from transforms import CTRATE_PATHOLOGIES

    if args.threads:
        torch.set_num_threads(args.threads)
    config = "ctclip_v2" if args.size == "v2" else "ctclip_tiny"
    fp32_rate = matmul_rate(torch.float32)
    cpu_rate = cpu_matmul_rate()
    bf16_rate = matmul_rate(torch.bfloat16) if torch.backends.mkldnn.is_available() else float("nan")
    print(f"matmul rate (2048^3, best of 5): fp32 {fp32_rate / 1e9:.0f} GFLOP/s, bf16 {bf16_rate / 1e9:.0f} GFLOP/s; "
          f"{machine_state()}", flush=True)

    torch.manual_seed(args.seed)
    model = create_model(config).eval()
    tokenizer = build_tokenizer({"tokenizer": "builtin:wordpiece"})  # offline stand-in for CXR-BERT's vocabulary
    classifier = ZeroShotClassifier(model, tokenizer, CTRATE_PATHOLOGIES, max_length=model.config.text.max_length)
    volume = (torch.randn((1,) + image_input_shape(model.config), generator=torch.Generator().manual_seed(1))
              * 0.5).clamp(-1, 1)
    meter = PartMeter(model)

    def forward():
        classifier.refresh_prompts()  # the text side counts in every pass
        return classifier(volume)

    rows, exact_probs, total_flops = {}, None, None
    for variant in args.variants:
        if variant == "bf16":
            model.autocast_dtype = torch.bfloat16
        elif variant == "int8":
            model.autocast_dtype = None
            quantize_variant(model)
        elif variant == "compile":
            model.autocast_dtype = None
            meter.remove()  # a Python hook inside a compiled layer breaks its graph: the compiled pass is timed whole
            compile_variant(model)
        reset_peak_rss()
        with torch.inference_mode():
            meter.reset()
            if total_flops is None:  # the first pass counts the FLOPs (and warms up)
                meter.counter = flop_counter()
                with meter.counter:
                    t0 = time.perf_counter()
                    probs = forward()
                    first_s = time.perf_counter() - t0
                total_flops = meter.counter.get_total_flops()
                meter.counter = None
            else:
                t0 = time.perf_counter()
                probs = forward()
                first_s = time.perf_counter() - t0
            best, seconds, best_cpu = float("inf"), {}, float("inf")
            for _ in range(args.repeats):
                meter.reset()
                c0 = time.process_time()
                s = timed(forward)[0]
                best_cpu = min(best_cpu, time.process_time() - c0)
                if s < best:
                    best, seconds = s, dict(meter.seconds)
            if variant == "exact" and args.ops:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    forward()
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops), flush=True)
        seconds["rest"] = best - sum(seconds.values())
        if exact_probs is None:
            exact_probs = probs
        rows[variant] = {"best_s": best, "best_cpu_s": best_cpu, "first_s": first_s, "parts": seconds, "peak_rss_mb": peak_rss_mb(),
                         "max_abs_dprob": float((probs - exact_probs).abs().max())}
        print(f"{variant}: best {best:.2f} s of {args.repeats} (first pass {first_s:.2f} s), peak RSS "
              f"{rows[variant]['peak_rss_mb']:.0f} MB, max |P - P_exact| {rows[variant]['max_abs_dprob']:.1e}; "
              f"{machine_state()}", flush=True)
    meter.remove()

    # the load of a shared machine changes within a run: the faster of the start and end rates is the floor
    fp32_end = matmul_rate(torch.float32)
    print(f"matmul rate at the end: fp32 {fp32_end / 1e9:.0f} GFLOP/s", flush=True)
    fp32_rate = max(fp32_rate, fp32_end)
    cpu_rate = max(cpu_rate, cpu_matmul_rate())
    floor_s = total_flops / fp32_rate
    floor_cpu_s = total_flops / cpu_rate
    print(f"\nconfig {config}, volume {tuple(volume.shape)}: {total_flops / 1e12:.3f} TFLOP per zero-shot forward; "
          f"floor at the fp32 matmul rate "
          f"({fp32_rate / 1e9:.0f} GFLOP/s) {floor_s:.2f} s")
    names = list(rows)
    print("| part | GFLOP | " + " | ".join(f"{v} s" for v in names) + f" | {names[0]} GFLOP/s | share of {names[0]} |")
    print("|---|---:|" + "---:|" * len(names) + "---:|---:|")
    flops = dict(meter.flops)
    first = rows[names[0]]
    for part in PARTS:
        f = flops.get(part, 0.0) if part != "rest" else total_flops - sum(flops.values())
        s0 = first["parts"].get(part, 0.0)
        print(f"| {part} | {f / 1e9:.4g} | " + " | ".join(f"{rows[v]['parts'].get(part, 0.0):.2f}" for v in names)
              + f" | {f / s0 / 1e9 if s0 > 0 else float('nan'):.0f} | {100 * s0 / first['best_s']:.0f}% |")
    print(f"| total | {total_flops / 1e9:.4g} | " + " | ".join(f"{rows[v]['best_s']:.2f}" for v in names)
          + f" | {total_flops / first['best_s'] / 1e9:.0f} | 100% |")
    for v in names:
        r = rows[v]
        goal = " (goal <= 2x)" if v == "exact" else ""
        print(f"{v}: {r['best_s']:.2f} s = {r['best_s'] / floor_s:.2f}x the fp32 floor{goal}; CPU time "
              f"{r['best_cpu_s']:.1f} s = {r['best_cpu_s'] / floor_cpu_s:.2f}x the CPU-time floor "
              f"({floor_cpu_s:.1f} CPU s at {cpu_rate / 1e9:.0f} GFLOP per CPU-second)"
              + (f", {first['best_s'] / r['best_s']:.2f}x faster than {names[0]}" if v != names[0] else "")
              + (f"; max |P - P_exact| {r['max_abs_dprob']:.1e}" if v != "exact" else ""))
    print(f"{machine_state()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("v2", "small"), default="v2",
                        help="v2: the published architecture at 480x480x240; small: ctclip_tiny, a smoke run")
    parser.add_argument("--variants", nargs="+", default=["exact", "bf16"],
                        choices=("exact", "bf16", "int8", "compile"))
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per variant (best reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--ops", type=int, default=0, help="print the top N aten ops of the exact pass")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.variants[0] != "exact":
        args.variants = ["exact"] + [v for v in args.variants if v != "exact"]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
