"""gzip levels on CT: compression time against size, and the inflate time of each stream (zlib and ISA-L).

The measurement behind ``ctclip_contract.files.GZIP_LEVEL`` (the level of every ``.gz`` the project writes). Input:
the uncompressed NIfTI bytes (header + int16 voxels) of ``benchmarks/preprocess.py``'s 512x512x300 chest phantom
(air outside a body ellipse, soft tissue 40 HU, lungs -850 HU, a spine at 700 HU, 15 HU noise), or of another
volume (``--nifti FILE``: a demo cohort volume, a ct_preprocess output; the level was chosen on the ct_preprocess
output of that phantom, the file the level is for). Every stream is decompressed by both zlib and ISA-L and compared
with the input bytes. Times are the best of ``--repeats`` in this process, wall and CPU, one thread (and, for
comparison, ISA-L with 2 threads through ``isal.igzip_threaded``; the project's writer uses one, see GZIP_LEVEL).

Usage: ``python benchmarks/gzip_levels.py [--repeats 3] [--nifti FILE]``. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isal import igzip, igzip_threaded, isal_zlib  # noqa: E402

from benchmarks.preprocess import make_volume  # noqa: E402


def best(fn, repeats):
    """Best wall and best CPU time (this process, all threads) of ``repeats`` calls, and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def threaded_compress(raw: bytes, level: int, threads: int) -> bytes:
    buf = io.BytesIO()
    with igzip_threaded.open(buf, "wb", compresslevel=level, threads=threads) as f:
        f.write(raw)
    return buf.getvalue()


def measure(raw: bytes, repeats: int) -> list[dict]:
    codecs = [("zlib", lv, lambda lv=lv: gzip.compress(raw, compresslevel=lv, mtime=0)) for lv in (1, 2, 3, 4, 6, 9)]
    codecs += [("isal", lv, lambda lv=lv: igzip.compress(raw, compresslevel=lv, mtime=0)) for lv in (0, 1, 2, 3)]
    rows = []
    for name, level, comp in codecs:
        t_c, c_c, blob = best(comp, 1 if (name, level) == ("zlib", 9) else repeats)
        t_z, c_z, out_z = best(lambda: zlib.decompress(blob, wbits=31), repeats)
        t_i, c_i, out_i = best(lambda: isal_zlib.decompress(blob, wbits=31), repeats)
        assert out_z == raw and out_i == raw, (name, level)
        row = {"codec": name, "level": level, "compress_s": t_c, "compress_cpu_s": c_c, "size_mb": len(blob) / 1e6,
               "ratio": len(raw) / len(blob), "inflate_zlib_s": t_z, "inflate_zlib_cpu_s": c_z,
               "inflate_isal_s": t_i, "inflate_isal_cpu_s": c_i}
        if name == "isal":
            row["compress_2threads_s"], _, blob2 = best(lambda: threaded_compress(raw, level, 2), repeats)
            assert gzip.decompress(blob2) == raw
            row["size_2threads_mb"] = len(blob2) / 1e6
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nifti", default=None, help="a .nii or .nii.gz to measure instead of the phantom")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "bench_gzip_levels"))
    args = ap.parse_args()
    if args.nifti:
        path = Path(args.nifti)
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        what = str(path)
    else:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        vol = work / "chest_512x512x300.nii.gz"
        if not vol.exists():
            make_volume(vol)
        raw = gzip.decompress(vol.read_bytes())
        what = "512x512x300 int16 chest phantom"
    load = os.getloadavg()[0]
    rows = measure(raw, args.repeats)
    print(f"{what}: {len(raw) / 1e6:.1f} MB uncompressed; best of {args.repeats}; 1-min load {load:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print("times: best wall s / best CPU s (CPU time is the steadier figure on a shared machine)")
    print(f"{'codec':6s} {'level':>5s} {'compress':>13s} {'2 threads':>9s} {'MB':>7s} {'ratio':>6s} "
          f"{'MB/s CPU':>8s} {'inflate zlib':>13s} {'inflate isal':>13s}")
    for r in rows:
        thr = f"{r['compress_2threads_s']:9.2f}" if "compress_2threads_s" in r else f"{'':9s}"
        print(f"{r['codec']:6s} {r['level']:5d} {r['compress_s']:6.2f}/{r['compress_cpu_s']:6.2f} {thr} "
              f"{r['size_mb']:7.1f} {r['ratio']:6.2f} {len(raw) / 1e6 / max(r['compress_cpu_s'], 1e-9):8.0f} "
              f"{r['inflate_zlib_s']:6.3f}/{r['inflate_zlib_cpu_s']:6.3f} "
              f"{r['inflate_isal_s']:6.3f}/{r['inflate_isal_cpu_s']:6.3f}")
    print(json.dumps({"input": what, "uncompressed_mb": len(raw) / 1e6, "load_average_1min": load, "rows": rows},
                     indent=2))


if __name__ == "__main__":
    main()
