"""Faults of the machine during the training stages, run as a user runs them (``python -m monai.bundle run`` in a
subprocess): SIGKILL at random points of ClassFine training, then a rerun; a full disk (a real tmpfs of a few MB)
for pretraining and ClassFine. After each fault every file that exists is whole (weights load with
``weights_only=True``, JSON parses), and the rerun completes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSFINE = ROOT / "bundles" / "ct_clip_classfine"
PRETRAIN = ROOT / "bundles" / "ct_clip_pretrain"
TINY = ["--model_config", "ctclip_tiny", "--num_workers", "0", "--batch_size", "4", "--val_batch_size", "4"]
# what atomic_path leaves when a run is killed mid-write: .<name>.<8 characters>.tmp<suffix>
TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\..+)?$")
ENOSPC_LINE = re.compile(r"error: OSError: \[Errno 28\] No space left on device: '(?P<path>.+)'")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")


def _cmd(bundle: Path, args) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.json"),
            "--bundle_root", str(bundle), *map(str, args)]


def _run(bundle: Path, args, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(bundle, args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _classfine_args(data, clip, out, epochs):
    return ["--dataset_dir", data, "--pretrained", clip, "--output_dir", out, "--epochs", str(epochs), *TINY]


def _temporaries(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob(".*") if TEMPORARY.match(p.name))


def _assert_whole(out: Path) -> list[str]:
    """Every weights file under ``out`` loads with weights_only=True and every JSON file parses; returns the names
    of the weights files."""
    weights = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".pt":
            obj = torch.load(p, map_location="cpu", weights_only=True)
            assert isinstance(obj, dict) and obj, p
            weights.append(str(p.relative_to(out)))
        elif p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
    return weights


def _strict_classfine(path: Path) -> None:
    from custom_nets import ClassFineClassifier, create_model

    model = ClassFineClassifier(create_model("ctclip_tiny"), num_classes=18)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)


class _Started:
    """Reads a run's output in a thread and tells when its trainer has started."""

    def __init__(self, proc: subprocess.Popen):
        self.event = threading.Event()
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)
            if "SupervisedTrainer" in line and "Engine run resuming from" in line:
                self.event.set()


def test_sigkill_at_random_points_of_classfine_training_then_rerun(tiny_preprocessed_dir, tiny_clip_checkpoint,
                                                                   tmp_path):
    """Three SIGKILLs at seeded random points after the trainer started (one the moment a temporary weights file
    appears, mid-write); after each, every file present is whole. ClassFine has no resume of its own: the rerun
    starts from epoch 1, removes the temporary files killed runs left, and completes with a model.pt that loads
    strictly into the ClassFine network and is the best epoch of that run."""
    rng = random.Random(27)
    out = tmp_path / "run"
    epochs = 500  # outlasts the latest random kill (4 s) with room: after the first epoch, each takes 0.02-0.2 s
    args = _classfine_args(tiny_preprocessed_dir, tiny_clip_checkpoint, out, epochs)
    kills, seen_temporaries = [], []
    for attempt in range(3):
        proc = subprocess.Popen(_cmd(CLASSFINE, args), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        reader = _Started(proc)
        try:
            assert reader.event.wait(timeout=180), "".join(reader.lines[-30:])
            started = time.monotonic()
            # the second kill waits for a write
            mid_write = attempt == 1
            deadline = started + (10.0 if mid_write else rng.uniform(0.2, 4.0))
            models = out / "models"
            while time.monotonic() < deadline and proc.poll() is None:
                if mid_write and models.is_dir() and any(n.startswith(".") and n.endswith(".tmp")
                                                         for n in os.listdir(models)):
                    break
                time.sleep(0.0005 if mid_write else 0.02)
            if proc.poll() is not None:
                break  # finished before this kill: nothing left to interrupt
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            kills.append(round(time.monotonic() - started, 2))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.thread.join(timeout=10)
        assert proc.returncode == -signal.SIGKILL, "".join(reader.lines[-30:])
        _assert_whole(out)  # nothing truncated, whatever the moment
        seen_temporaries += [str(p.relative_to(out)) for p in _temporaries(out)]
    assert kills, "the run finished before the first kill"
    stale = out / "models" / ".model.pt.k1ll3d00.tmp"
    stale.write_bytes(b"PK\x03\x04 half a zip")  # as a kill in the middle of torch.save leaves it
    # the rerun starts over, so it needs no more epochs than it takes to show that: the killed runs' 500 are only
    # there to outlast the kills
    rerun_epochs = 4
    done = _run(CLASSFINE, _classfine_args(tiny_preprocessed_dir, tiny_clip_checkpoint, out, rerun_epochs))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "temporary file(s) a killed run left behind" in done.stdout + done.stderr
    assert _temporaries(out) == [] and not (out / ".lock").exists()
    weights = _assert_whole(out)
    assert {"models/model.pt", "models/model_final.pt"} <= set(weights)
    _strict_classfine(out / "models" / "model.pt")
    _strict_classfine(out / "models" / "model_final.pt")
    rows = json.loads((out / "eval" / "metrics_per_epoch.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, rerun_epochs + 1))
    best = json.loads((out / "models" / "model.pt.json").read_text())
    scores = [r["macro_auroc"] for r in rows if r.get("macro_auroc") == r.get("macro_auroc")]
    assert best["value"] == pytest.approx(max(scores))  # the rerun's own best epoch, not a killed run's
    print(f"killed {kills} s after the trainer started; temporaries left by the kills: {seen_temporaries}")


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)`` -> a fresh tmpfs of that size (a real full disk); ``remount(path, size)`` grows it. Skipped
    where mounting is not allowed; unmounted at the end."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
        mounted.append(point)
        return point

    def remount(point: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True, capture_output=True)

    mount.remount = remount
    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def _assert_stopped_by_a_full_disk(done: subprocess.CompletedProcess, out: Path) -> Path:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stdout[-2000:]
    found = ENOSPC_LINE.fullmatch(lines[-1])
    assert found, lines[-5:]  # one line that names the fault and the file
    path = Path(found["path"])
    assert path.suffix == ".pt" and out in path.parents, path  # saving weights hit the full disk
    assert _temporaries(out) == [] and not (out / ".lock").exists()  # no temporary file; the folder is free
    _assert_whole(out)
    return path


def test_a_full_disk_stops_pretraining_and_the_rerun_resumes(tiny_preprocessed_dir, tmp_path, tmpfs):
    """Pretraining into a 3 MB tmpfs: a training state (1.2 MB) and the weights fit once, not twice; the save that
    does not fit stops the run with one line. Given room (the same folder, remounted larger), the rerun resumes
    from the newest state and completes."""
    from custom_nets import create_model, load_checkpoint
    from workflows.checkpoints import list_checkpoints

    disk = tmpfs("3m")
    out = disk / "out"
    args = ["--dataset_dir", tiny_preprocessed_dir, "--output_dir", out, "--epochs", "2", "--model_config",
            "ctclip_tiny", "--num_workers", "0", "--progress", "False", "--batch_size", "2", "--val_batch_size", "4"]
    failed = _run(PRETRAIN, args)
    _assert_stopped_by_a_full_disk(failed, out)
    saved = list_checkpoints(out / "checkpoints")
    assert saved, "no training state fitted: the disk is too small for this test"
    tmpfs.remount(disk, "64m")
    done = _run(PRETRAIN, args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = json.loads((out / "checkpoints" / "resume_log.json").read_text())
    assert resumed[-1]["iteration"] == saved[-1][0]  # from the newest state the full disk left
    assert _temporaries(out) == []
    _assert_whole(out)
    load_checkpoint(create_model("ctclip_tiny"), out / "models" / "model.pt")  # strict
    assert (out / "models" / "model_final.pt").is_file()


def test_a_full_disk_stops_classfine_training_and_the_rerun_completes(tiny_preprocessed_dir, tiny_clip_checkpoint,
                                                                      tmp_path, tmpfs):
    """ClassFine into a tmpfs with 200 KB left: the first model.pt (450 KB) does not fit; one line names the fault
    and the file; nothing corrupt is left. Once the space is freed the rerun (ClassFine starts over) completes."""
    disk = tmpfs("3m")
    filler = disk / "filler"
    stat = os.statvfs(disk)
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 200 * 1024))
    out = disk / "out"
    args = _classfine_args(tiny_preprocessed_dir, tiny_clip_checkpoint, out, 2)
    failed = _run(CLASSFINE, args)
    path = _assert_stopped_by_a_full_disk(failed, out)
    assert path.parent == out / "models"
    filler.unlink()
    done = _run(CLASSFINE, args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _temporaries(out) == []
    _assert_whole(out)
    _strict_classfine(out / "models" / "model.pt")
