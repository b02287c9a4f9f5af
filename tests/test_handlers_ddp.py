"""ClassificationEvaluationHandler under two-process DDP (gloo, CPU): gather, de-duplicate, write once.

The ranks are forked from the test process, which has already imported torch and MONAI, so the test
costs seconds rather than two fresh MONAI imports.
"""

import json
import multiprocessing as mp
import sys
import traceback

import numpy as np
import pytest
import torch

from test_handlers import TinyClassifier, _datalist
from workflows.metrics import evaluate_classification
from workflows.writers import read_predictions_csv

N_DDP = 11  # odd: the sampler pads one rank with a repeated volume


def _rank_main(rank, world, init_file, out_dir, queue):
    try:
        import torch.distributed as dist
        from monai.data import DataLoader, Dataset, DistributedSampler
        from monai.engines import SupervisedEvaluator

        from workflows.handlers import ClassificationEvaluationHandler, MetricsPerEpochWriter

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        data = _datalist(n=N_DDP)
        # even_divisible=True pads rank 1 with a repeat of a volume: the handler must drop it
        sampler = DistributedSampler(Dataset(data), shuffle=False, even_divisible=True)
        loader = DataLoader(Dataset(data), batch_size=2, sampler=sampler, num_workers=0)
        handler = ClassificationEvaluationHandler(out_dir, n_bootstrap=50, seed=0, write_plots=False)
        evaluator = SupervisedEvaluator(
            device=torch.device("cpu"),
            val_data_loader=loader,
            network=TinyClassifier().eval(),
            val_handlers=[handler, MetricsPerEpochWriter(out_dir)],
        )
        evaluator.run()
        queue.put((rank, float(evaluator.state.metrics["macro_auroc"]), None))
        dist.destroy_process_group()
    except Exception:  # report to the parent instead of hanging it
        queue.put((rank, None, traceback.format_exc()))


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork")
@pytest.mark.timeout(120)
def test_two_rank_evaluation_gathers_every_volume_once(tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    out_dir = tmp_path / "eval"
    procs = [ctx.Process(target=_rank_main, args=(r, 2, tmp_path / "init", out_dir, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=100) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # a hung rank must not outlive the test
                p.kill()
    errors = [err for _, _, err in results if err]
    assert not errors, errors[0]

    data = _datalist(n=N_DDP)
    names, probs = read_predictions_csv(out_dir / "predictions.csv")
    assert sorted(names) == sorted(d["name"] for d in data)  # all volumes, padding repeat dropped
    with torch.no_grad():
        expected = TinyClassifier().eval()(torch.stack([d["image"] for d in data])).numpy()
    order = [int(n.split("_")[1]) for n in names]
    np.testing.assert_allclose(probs, expected[order], atol=1e-6)

    labels = torch.stack([d["label"] for d in data]).numpy()
    reference = evaluate_classification(labels[order], expected[order], n_bootstrap=50, seed=0)
    written = json.loads((out_dir / "metrics.json").read_text())
    assert written["n_cases"] == N_DDP
    assert written["auroc"]["macro"] == pytest.approx(reference["auroc"]["macro"], abs=1e-6)
    # both ranks hold the same metric (a checkpoint or early-stop rule agrees across ranks)
    values = sorted(results)
    assert values[0][1] == pytest.approx(values[1][1]) == pytest.approx(reference["auroc"]["macro"], abs=1e-6)
    rows = json.loads((out_dir / "metrics_per_epoch.json").read_text())
    assert [r["epoch"] for r in rows] == [1]  # written by rank 0 only
