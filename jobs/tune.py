"""Ray Jobs entrypoint for a Ray Tune search over task weighting and architecture.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune.yaml
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune.yaml --resume
    mtseg tune --config jobs/configs/tune_pbt.yaml                       # the same, in this process

Thin on purpose: parse, call mtseg, exit. A driver that was lost (or a stopped job) is
continued with --resume: finished trials are kept, unfinished ones resume from their
checkpoints. The trial table (CSV, markdown) and the best config as a ready `mtseg train`
YAML land under <train.storage_path>/<tune.experiment_name>/results/.
"""

import sys

from mtseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
