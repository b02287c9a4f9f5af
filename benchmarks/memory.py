"""Readings shared by the benchmark scripts (run as ``python benchmarks/<name>.py``): memory (current and peak RSS),
the one timing helper (best and all of N timed calls) and the machine state every printed figure carries."""

from __future__ import annotations

import os
import resource
import time
from typing import Callable, Optional


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (``VmHWM``), in MB; ``ru_maxrss`` (the peak
    since the process started) when ``/proc`` is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object], repeats: int = 1, warmup: int = 0,
          sync: Optional[Callable[[], None]] = None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read so that queued device work is counted. On a shared
    machine report ``min`` (best of N): other load only ever adds time."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def machine_state() -> str:
    """Threads, CPUs and the 1/5/15-minute load average: printed with every figure (a loaded machine is slower)."""
    try:
        import torch
        threads = f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
    except ImportError:  # the preprocessing benchmark's children may run without torch imported
        threads = ""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{threads}{os.cpu_count()} CPUs, load average {load}"


def matmul_rate(dtype=None, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-``repeats`` FLOP/s of an ``n x n`` by ``n x n`` matrix product in ``dtype`` (default float32) on
    ``device``: the rate a compute floor is measured against, in the same run as the figure it bounds."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    return 2 * n ** 3 / min(timed(lambda: a @ b, repeats=repeats, warmup=1, sync=sync))


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # CPU fused attention: q k^T and attn v (FlopCounterMode knows the CUDA kernels only)
    *batch, n, d = query_shape
    b = 1
    for s in batch:
        b *= s
    return 2 * b * n * key_shape[-2] * (d + value_shape[-1])


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # the recomputed scores, grad of v, of the weights, of q and of k: 5 products against the forward's 2
    return _sdpa_cpu_flop(query_shape, key_shape, value_shape) * 5 // 2


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    # torch's formula ignores groups in backward (a depthwise conv counts as dense, ~250x too much for the PEG);
    # the forward formula reads the grouped weight shape right: one such product per gradient asked for
    from torch.utils.flop_counter import conv_flop_count

    per = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return per * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` (no display) that also counts CPU fused attention and counts
    grouped-convolution backward right. Works on the meta device: a full-size count needs no compute."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
        aten.convolution_backward: _conv_backward_flop})
