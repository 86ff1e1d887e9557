"""Where the cells of the compare grid run: one seam, two executors.

A cell is a JSON spec for ``python -m wclust.measure.worker``; ``run_cell`` runs one in
a fresh subprocess. An executor runs a list of cells and returns their results in the
order given:

- ``local``: one after another on this machine, so measurements never contend;
- ``ray``: each cell a Ray task that asks for the CPUs (and GPU) it uses; independent
  cells run at once across the cluster. Needs ``pip install 'wclust[ray]'``; on a
  multi-node cluster every node needs wclust and the models, and the output folder
  must be on a filesystem all nodes share (cells write artifacts there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from ..registry import EXECUTORS
from .worker import MARK, cell_resources

__all__ = ["LocalExecutor", "RayExecutor", "get_executor", "run_cell"]

RAY_MISSING = "the ray executor needs: pip install 'wclust[ray]'"


def run_cell(spec: dict, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run one worker process on ``spec``.

    Args:
        spec: the cell (see ``wclust.measure.worker``).
        timeout: seconds before the worker is killed (``subprocess.TimeoutExpired``).
        env: extra environment variables for the worker.

    Returns:
        The worker's result dict; ``{"ok": False, "error": ...}`` when it crashed.
    """
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONUNBUFFERED": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "wclust.measure.worker"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"ok": False, "error": f"worker exited with {proc.returncode}: {tail}"}


Hook = Callable[[int], None] | None
DoneHook = Callable[[int, dict], None] | None


@EXECUTORS.register("local", "one cell after another on this machine (default)")
class LocalExecutor:
    """Runs cells one after another, each in its own subprocess of this process."""

    name = "local"

    def __init__(self, address: str | None = None):
        if address is not None:
            raise ValueError("--address is only for --executor ray")

    def map(self, specs: list[dict], on_start: Hook = None, on_done: DoneHook = None) -> list[dict]:
        """Run ``specs`` in order.

        Args:
            specs: worker cells.
            on_start: called with a cell's index when it starts.
            on_done: called with a cell's index and result when it ends.

        Returns:
            One result dict per spec, in the order of ``specs``.
        """
        results = []
        for i, spec in enumerate(specs):
            if on_start:
                on_start(i)
            results.append(run_cell(spec))
            if on_done:
                on_done(i, results[-1])
        return results

    def close(self) -> None:
        """Nothing to release."""


@EXECUTORS.register("ray", "each cell a Ray task; --address ADDR joins a running cluster")
class RayExecutor:
    """Runs cells as Ray tasks, all submitted at once; Ray schedules them on free CPUs.

    Each task asks for ``threads`` CPUs, and a GPU when the cell measures on one and the
    cluster has GPUs; inside, it runs the same ``run_cell`` as the local executor.

    Args:
        address: a running cluster (``ray.init(address=...)``). None: the Ray this process
            already joined, else ``ray.init``'s default (``$RAY_ADDRESS``, a running
            local Ray, or a new one).
        init_kwargs: more ``ray.init`` arguments, used when this executor starts Ray.
    """

    name = "ray"

    def __init__(self, address: str | None = None, **init_kwargs):
        try:
            import ray
        except ImportError:
            raise ImportError(RAY_MISSING) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, **{"include_dashboard": False, **init_kwargs})
            except ConnectionError as e:
                raise ValueError(f"cannot connect to Ray at {address}: {e}") from None
            self._started = True
        self._cell = ray.remote(run_cell)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self._max_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
        self._gpus = any(r.get("GPU", 0) > 0 for r in nodes)

    def map(self, specs: list[dict], on_start: Hook = None, on_done: DoneHook = None) -> list[dict]:
        """Submit all ``specs`` at once and wait for them.

        Args:
            specs: worker cells.
            on_start: called with a cell's index when it is submitted.
            on_done: called with a cell's index and result as each ends (any order).

        Returns:
            One result dict per spec, in the order of ``specs``.
        """
        if not specs:
            return []
        cell = self._cell
        needs = [cell_resources(spec) for spec in specs]
        most = max(n["cpus"] for n in needs)
        if most > self._max_cpus:  # Ray would wait for such a node forever
            raise ValueError(
                f"a cell asks for {most} CPUs (--threads) but no Ray node has more than "
                f"{self._max_cpus:g}"
            )
        refs = []
        for i, (spec, need) in enumerate(zip(specs, needs, strict=True)):
            task = cell.options(
                num_cpus=need["cpus"], num_gpus=1 if need["gpu"] and self._gpus else 0
            )
            # numba's kernel threads, like torch's (Ray sets OMP_NUM_THREADS), stay
            # within the CPUs the task holds.
            refs.append(task.remote(spec, env={"NUMBA_NUM_THREADS": str(need["cpus"])}))
            if on_start:
                on_start(i)
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[dict | None] = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = self._ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                try:
                    results[i] = self._ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost task is that cell's error
                    results[i] = {"ok": False, "error": f"ray task failed: {e}"}
                if on_done:
                    on_done(i, results[i])
        return results

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._started:
            self._ray.shutdown()
            self._started = False


def get_executor(name: str = "local", address: str | None = None):
    """An executor by name (``wclust.registry.EXECUTORS``).

    Args:
        name: ``local`` or ``ray``.
        address: Ray cluster address (ray only).

    Returns:
        An object with ``map(specs, on_start=None, on_done=None) -> list[dict]`` and
        ``close()``.
    """
    return EXECUTORS.get(name)(address=address)
