"""What the rest of the machine did while a figure was measured: a busy neighbour, in the record beside the figure.

A latency or a LoadGen rate measured while another process kept a core busy (a build, a second benchmark, another
tenant's job) is a different number from the same measurement on a quiet machine, and on a shared machine nothing
else in the record says so. ``watch`` reads the kernel's CPU counters around a block: the busy time of the CPUs this
process may run on (its affinity) less this process's own (all its threads: the backend's pool, LoadGen's, the
batcher's) is what *other* processes took, in cores on average over the block; on a VM, the time the hypervisor gave
to other guests (``steal``) is a neighbour too. By default child processes count as others (a neighbour a benchmark
starts itself is seen); ``watch(tree)`` counts a whole process tree as ours instead: a training run's DataLoader
workers, and under torchrun every local rank.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil

# Other processes busy on this many cores on average, or this share of every core's time stolen, and a figure is
# marked as measured beside a busy neighbour (an idle Linux box shows ~0.01 cores of daemons and kernel threads).
BUSY_CORES = 0.25
STOLEN_SHARE = 0.05
# A CPU's busy time; ``steal`` is apart (time this machine did not get), ``guest`` is inside ``user``.
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq")


def _cpu_seconds() -> tuple[float, float, int]:
    """Busy and stolen seconds summed over the CPUs this process may run on (its affinity: a process on other CPUs
    is no neighbour; all CPUs where the platform has no affinity), and how many CPUs that is."""
    times = psutil.cpu_times(percpu=True)
    with suppress(AttributeError, psutil.Error):  # no affinity on this platform: every CPU
        cpus = psutil.Process().cpu_affinity()
        if cpus and max(cpus) < len(times):
            times = [times[i] for i in cpus]
    return (sum(getattr(t, name, 0.0) for t in times for name in BUSY_FIELDS),
            sum(getattr(t, "steal", 0.0) for t in times), len(times))


def _seconds(process: psutil.Process, reaped: bool) -> float:
    """A process's CPU time (all its threads), with its reaped children's when ``reaped``."""
    t = process.cpu_times()
    return t.user + t.system + (t.children_user + t.children_system if reaped else 0.0)


def _ours(tree: psutil.Process | None) -> tuple[float, dict[int, float]]:
    """CPU seconds of this process (``tree`` None), or of ``tree``'s root and reaped children, and of each live
    descendant of it (a descendant reaped during the block is in its parent's reaped time by the end)."""
    if tree is None:
        return _seconds(psutil.Process(), reaped=False), {}
    live = {}
    for child in tree.children(recursive=True):
        with suppress(psutil.Error):  # ended between listing and reading
            live[child.pid] = _seconds(child, reaped=True)
    return _seconds(tree, reaped=True), live


def tree_of_this_run(torchrun: bool) -> psutil.Process:
    """The process tree a run's CPU time is spent in: under torchrun its agent's (every local rank and their workers),
    else this process's (its DataLoader workers)."""
    me = psutil.Process()
    return (me.parent() or me) if torchrun else me


@contextmanager
def watch(tree: psutil.Process | None = None) -> Iterator[dict]:
    """The machine's load over the block, in the dict this yields (filled on exit): ``seconds`` (wall),
    ``other_processes_cores`` (busy cores not ours, on average: ours is this process's threads, or the whole of
    ``tree``), ``steal_share`` (share of all cores' time the hypervisor stole; 0 on bare metal) and ``cores``."""
    out: dict = {}
    wall0, (busy0, stolen0, _), (root0, live0) = time.perf_counter(), _cpu_seconds(), _ours(tree)
    try:
        yield out
    finally:
        wall, (busy1, stolen1, cores), (root, live) = time.perf_counter() - wall0, _cpu_seconds(), _ours(tree)
        mine = root - root0 + sum(t - live0.get(pid, 0.0) for pid, t in live.items()) \
            - sum(t for pid, t in live0.items() if pid not in live)  # reaped: whole lifetime in root's, less before
        others = max(0.0, busy1 - busy0 - mine)
        out.update(seconds=round(wall, 3), other_processes_cores=round(others / wall, 2) if wall > 0 else None,
                   steal_share=round((stolen1 - stolen0) / (wall * cores), 3) if wall > 0 else None, cores=cores)


def busy(load: dict | None) -> bool:
    """Whether ``load`` (what ``watch`` measured; empty in records written before it) saw a busy neighbour."""
    load = load or {}
    return (load.get("other_processes_cores") or 0) >= BUSY_CORES or (load.get("steal_share") or 0) >= STOLEN_SHARE


def describe(load: dict | None) -> str:
    """``"others 1.02 cores, 0.4% stolen"``; empty for a record written before the machine's load was watched."""
    if not load or load.get("other_processes_cores") is None:
        return ""
    return f"others {load['other_processes_cores']:.2f} cores, {load['steal_share']:.1%} stolen"


def tag(load: dict | None) -> str:
    """What a log line ends with when it was measured beside a busy neighbour (``"  [busy neighbour: …]"``), else
    nothing."""
    return f"  [busy neighbour: {describe(load)}]" if busy(load) else ""


def combine(loads: list[dict]) -> dict:
    """Several blocks' loads as one (wall-time weighted): a find-max search's runs, a sweep's cells. Empty when none
    of them was watched."""
    loads = [x for x in loads if x and x.get("seconds") and x.get("other_processes_cores") is not None]
    if not loads:
        return {}
    seconds = sum(x["seconds"] for x in loads)
    return {"seconds": round(seconds, 3),
            "other_processes_cores": round(sum(x["other_processes_cores"] * x["seconds"] for x in loads) / seconds, 2),
            "steal_share": round(sum(x["steal_share"] * x["seconds"] for x in loads) / seconds, 3),
            "cores": loads[0]["cores"]}


def _spin() -> None:
    while True:
        pass


@contextmanager
def neighbours(n: int) -> Iterator[None]:
    """``n`` processes that spin a core each until the block ends: a busy neighbour made to order (benchmarks)."""
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.join()
