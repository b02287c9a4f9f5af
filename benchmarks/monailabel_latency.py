"""What the MONAI Label server adds to one classification: ``POST /infer`` latency against the bundle's own inference
on the same volume, in the same environment (the one ``make label`` builds).

* ``bundle run``: ``python -m monai.bundle run --config_file configs/inference.json --input SCAN``, wall time of the
  whole command (what a user waits for without the server: imports, model build, weights, one volume);
* ``bundle in-process``: the bundle's own ``inference.json`` pipeline held in memory
  (:class:`workflows.served_bundle.ServedBundle`), median of ``--requests`` calls: the compute of one volume;
* ``server /infer``: ``monailabel start_server`` on 127.0.0.1 with the bundle, median of ``--requests``
  ``POST /infer/<model>?image=<id>&output=json`` after one warm-up request.

The goal: server median at most 1.2x the in-process median plus 0.3 s.

Usage: ``python benchmarks/monailabel_latency.py --bundle demo_output/bundles/ct_clip_classfine_ctclip_small
--scan SCAN.nii.gz [--requests 10] [--label_python .venv-label/bin/python]``. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from workflows.monailabel_server import monailabel_server

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

IN_PROCESS = """
import json, statistics, sys, time
from workflows.served_bundle import ServedBundle
served = ServedBundle(sys.argv[1])
served.predict(sys.argv[2])  # warm-up, as the server's first request
times = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    served.predict(sys.argv[2])
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def _post(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=600) as response:
        json.loads(response.read())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="an exported zero-shot or ClassFine bundle folder")
    parser.add_argument("--scan", required=True, help="a .nii.gz volume")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--label_python", default=str(REPO / ".venv-label" / "bin" / "python"))
    args = parser.parse_args()
    python, bundle, scan = args.label_python, Path(args.bundle).resolve(), Path(args.scan).resolve()
    env = {**os.environ, **OFFLINE}

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        start = time.perf_counter()
        subprocess.run([python, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input",
                        str(scan), "--output_dir", str(work / "own")], cwd=bundle, env=env, check=True,
                       capture_output=True)
        cli = time.perf_counter() - start
        in_process = json.loads(subprocess.run([python, "-c", IN_PROCESS, str(bundle), str(scan), str(args.requests)],
                                               env=env, check=True, capture_output=True, text=True).stdout)

        (work / "bundles").mkdir()
        (work / "bundles" / "model").symlink_to(bundle)
        studies = work / "studies"
        studies.mkdir()
        shutil.copy(scan, studies / "scan.nii.gz")
        app = shutil.copytree(REPO / "monailabel_app", work / "app",
                              ignore=shutil.ignore_patterns("bin", "lib", "model", "logs", "finetuned"))
        conf = {"models": "model", "bundles": str(work / "bundles"), "finetuned_dir": str(work / "finetuned")}
        with monailabel_server(python, app, studies, conf, work, env=env, timeout=300) as url:
            infer = f"{url}/infer/model?image=scan&output=json"
            _post(infer)  # warm-up: the bundle is loaded on first use
            served = [_post(infer) for _ in range(args.requests)]

    own = statistics.median(in_process)
    med = statistics.median(served)
    goal = 1.2 * own + 0.3
    rows = [("bundle run (whole command)", cli), ("bundle in-process, median", own), ("server /infer, median", med)]
    print(f"{'what':32s} {'seconds':>8s}")
    for name, value in rows:
        print(f"{name:32s} {value:8.3f}")
    print(f"server / in-process: {med / own:.2f}x (+{med - own:.3f} s); goal <= 1.2x + 0.3 s = {goal:.3f} s: "
          f"{'met' if med <= goal else 'not met'}; server / whole command: {med / cli:.3f}x")
    print(json.dumps({"bundle": str(bundle), "scan": str(scan), "requests": args.requests, "bundle_run_s": cli,
                      "in_process_s": in_process, "server_s": served, "ratio": med / own, "goal_met": med <= goal}))


if __name__ == "__main__":
    main()
