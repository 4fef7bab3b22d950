"""Ray Jobs entrypoint for evaluation.

    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://bucket/runs/demo --data s3://bucket/shards --split val2017
    mtseg evaluate --checkpoint s3://bucket/runs/demo --data s3://bucket/shards    # the same, in this shell

Thin on purpose: parse, call mtseg, exit. Batch inference runs in Ray Data: an actor per GPU
when the cluster has GPUs, else in the read + decode tasks; metrics.json and metrics.md are
written beside the checkpoint and the table is printed to the job's log.
"""

import sys

from mtseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
