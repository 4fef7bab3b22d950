"""Train on a multi-node ``ray.cluster_utils.Cluster`` and remove the node that hosts the workers.

Run by ``test_train_ray.py`` in its own process (the test session's in-process Ray cannot
host a second cluster): ``python node_removal.py OVERRIDE...``. Prints one JSON line:
the run's error (or null), its final step, and the removed node's id and worker count.

The head has no CPUs, so only the Train controller (``num_cpus=0``, pinned to the driver's
node) lives there; three 1-CPU worker nodes host the Train workers and the Ray Data tasks.
Removing a node kills its raylet and every process on it without a graceful exit, as a
lost machine would.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from mtseg.cluster import LOOPBACK, apply_loopback_env

WORKER_NODES = 3


def _nodes_hosting_train_workers(cluster) -> dict[str, int]:
    counts: dict[str, int] = {}
    for actor in cluster.global_state.actor_table(None, actor_state_name="ALIVE").values():
        if actor["ActorClassName"] == "RayTrainWorker":
            node = actor["Address"]["NodeID"]
            counts[node] = counts.get(node, 0) + 1
    return counts


def main(overrides: list[str]) -> int:
    apply_loopback_env()
    import ray
    from ray.cluster_utils import Cluster

    from mtseg.config import load_config
    from mtseg.train import checkpoint as ckpt
    from mtseg.train.trainer import run_training, run_uri

    node_args = {"node_ip_address": LOOPBACK, "object_store_memory": 80 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "num_cpus": 0, "include_dashboard": False})
    workers = {cluster.add_node(**node_args, num_cpus=1) for _ in range(WORKER_NODES)}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    cfg = load_config(None, overrides)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", run_training(cfg, log=lambda *a: None)))
    thread.start()
    deadline = time.monotonic() + 300
    while not ckpt.latest_valid(run_uri(cfg), log=lambda *a: None):
        if time.monotonic() > deadline or not thread.is_alive():
            print(json.dumps({"error": "no checkpoint before the node could be removed"}))
            return 1
        time.sleep(0.5)
    hosting = _nodes_hosting_train_workers(cluster)
    victim = next(n for n in workers if n.node_id in hosting)
    step_at_removal = ckpt.latest_valid(run_uri(cfg), log=lambda *a: None)[1]["step"]
    cluster.remove_node(victim, allow_graceful=False)
    thread.join(timeout=900)
    result = out.get("result")
    print(
        json.dumps(
            {
                "error": None if result is None or result.error is None else str(result.error).splitlines()[-1],
                "finished": result is not None,
                "step": result.metrics.get("train/step") if result is not None and result.metrics else None,
                "removed_node": victim.node_id,
                "workers_on_removed_node": hosting[victim.node_id],
                "step_at_removal": step_at_removal,
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
