"""`apicv fuzz --cluster ADDRESS`: a campaign's cases spread over the nodes of a Ray cluster.

Ray (the ``cluster`` extra: ``pip install 'apicv[cluster]'``, the same apicv on every node)
does the distribution; this module only says what runs where. At start one probe task is
pinned to every alive node (NodeAffinitySchedulingStrategy, not soft): it answers whether the
node has a usable /dev/kvm and, if so, its host fingerprint
(:func:`apicv.kvm.fingerprint.host_fingerprint`). Chunks of cases then go to the nodes with
KVM, round robin weighted by their CPUs, each chunk pinned to its node; each node's worker
processes keep their own VMs and model of that host (:func:`apicv.campaign.run_chunk`). A
disagreement is shrunk on a node with the fingerprint it was found on.

ADDRESS is what ``ray.init(address=...)`` takes (``auto``, ``HOST:PORT``,
``ray://HOST:10001``); ``local`` starts a throwaway cluster on this machine with
``--workers`` CPUs (for trying it out, and for the tests), stopped at the end.
"""

from __future__ import annotations

import itertools
from typing import Any

from .errors import ApicvError

EXTRA = "pip install 'apicv[cluster]'"


def check_ray() -> None:
    """ApicvError in one line, naming the extra, when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ApicvError(f"apicv fuzz --cluster needs Ray: {EXTRA}") from None


def _probe() -> dict[str, Any]:
    """On a node: whether /dev/kvm is usable there, and its fingerprint."""
    from .kvm import kvm_available

    ok, why = kvm_available()
    if not ok:
        return {"ok": False, "why": why}
    from .campaign import worker_fingerprint

    return {"ok": True, "fingerprint": worker_fingerprint()}


class _Ref:
    """A Ray task as the campaign loop sees a task (ready, get)."""

    def __init__(self, ray: Any, ref: Any) -> None:
        self.ray = ray
        self.ref = ref

    def ready(self) -> bool:
        done, _ = self.ray.wait([self.ref], timeout=0)
        return bool(done)

    def get(self, timeout: float | None = None) -> Any:
        return self.ray.get(self.ref, timeout=timeout)


class RayExecutor:
    """Runs the campaign's chunks on the KVM nodes of a Ray cluster."""

    def __init__(self, address: str, workers: int) -> None:
        check_ray()
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from . import campaign

        self.ray = ray
        self._affinity = NodeAffinitySchedulingStrategy
        self.started = not ray.is_initialized()
        if self.started:
            opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                    "configure_logging": False}
            if address == "local":
                ray.init(num_cpus=workers, **opts)
            else:
                ray.init(address=address, **opts)
        self._chunk = ray.remote(num_cpus=1)(campaign.run_chunk)
        self._shrink = ray.remote(num_cpus=1)(campaign.shrink_case)
        probe = ray.remote(num_cpus=1)(_probe)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        answers = ray.get([probe.options(scheduling_strategy=self._pin(n["NodeID"])).remote()
                           for n in alive])
        self.kvm_nodes: list[tuple[str, dict[str, Any], int]] = []
        self.skipped: list[str] = []
        for n, a in zip(alive, answers, strict=True):
            cpus = max(1, int(n.get("Resources", {}).get("CPU", 1)))
            if a["ok"]:
                self.kvm_nodes.append((n["NodeID"], a["fingerprint"], cpus))
            else:
                self.skipped.append(f"{n.get('NodeManagerAddress', n['NodeID'])}: {a['why']}")
        if not self.kvm_nodes:
            self.close()
            raise ApicvError("no node of the Ray cluster has a usable /dev/kvm ("
                             + "; ".join(self.skipped) + ")")
        self.nodes = sum(c for _, _, c in self.kvm_nodes)
        slots = [nid for nid, _, c in self.kvm_nodes for _ in range(c)]
        self._next = itertools.cycle(slots)

    def _pin(self, node_id: str) -> Any:
        return self._affinity(node_id=node_id, soft=False)

    def warm_up(self) -> None:
        """Nothing: each node's workers started while probing."""

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {fp["id"]: fp for _, fp, _ in self.kvm_nodes}

    def submit_chunk(self, spec: Any, start: int, end: int) -> _Ref:
        node = next(self._next)
        return _Ref(self.ray, self._chunk.options(scheduling_strategy=self._pin(node))
                    .remote(spec, start, end))

    def submit_shrink(self, spec: Any, fingerprint: str, index: int,
                      choices: list[int]) -> _Ref:
        node = next(nid for nid, fp, _ in self.kvm_nodes if fp["id"] == fingerprint)
        return _Ref(self.ray, self._shrink.options(scheduling_strategy=self._pin(node))
                    .remote(spec, index, choices))

    def close(self, abort: bool = False) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
