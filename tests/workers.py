"""Launching the worker processes of the multi-process (gloo) tests: one helper for every such test file."""

from __future__ import annotations

import os
import subprocess
import sys

WORKER_TIMEOUT_S = 180


def run_ranks(script: str, world: int, args: list[str], label: str = "") -> None:
    """Run ``python script rank world *args`` for every rank (one thread each) and wait; a worker that
    fails or hangs past :data:`WORKER_TIMEOUT_S` is a ``RuntimeError`` carrying the workers' output
    (every process is killed first)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=WORKER_TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        what = f"distributed workers ({label})" if label else "distributed workers"
        raise RuntimeError(f"{what} failed, exit codes {[p.returncode for p in procs]}:\n"
                           + "\n".join(log[-4000:] for log in logs))
