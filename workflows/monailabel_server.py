"""This repository's MONAI Label app as a local server on 127.0.0.1, started and stopped around a block of code:
what the app's tests and its latency benchmark run against. Users start the server as ``monailabel_app/README.md``
says; this module is the same command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from .distributed import free_port

__all__ = ["monailabel_server"]


@contextlib.contextmanager
def monailabel_server(python: str | os.PathLike, app: str | os.PathLike, studies: str | os.PathLike,
                      conf: Mapping[str, str], work: str | os.PathLike, env: Mapping[str, str] | None = None,
                      timeout: float = 180.0) -> Iterator[str]:
    """Run ``monailabel start_server`` on 127.0.0.1 at a free port until the block ends; yields its URL.

    Args:
        python: the interpreter of the environment that has MONAI Label (``.venv-label``).
        app: the app folder (a copy of ``monailabel_app``).
        studies: the studies folder it serves.
        conf: the app's ``--conf`` settings (``models``, ``bundles``, ``finetuned_dir``, ...).
        work: working directory; the server's output goes to ``work/server.log``.
        env: the server's environment (default: this process's).
        timeout: seconds to wait for ``/info/`` to answer.

    Raises:
        RuntimeError: the server exited or did not answer in time; the message ends with its log.
    """
    work = Path(work)
    port = free_port()
    command = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(work / "server.log", "w") as log:
        # its own process group: the server and the workers it starts stop together
        proc = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ if env is None else env), start_new_session=True)
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    urllib.request.urlopen(f"{url}/info/", timeout=5).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"the MONAI Label server did not start:\n"
                                           f"{(work / 'server.log').read_text()[-3000:]}") from None
                    time.sleep(1)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
