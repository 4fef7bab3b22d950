"""Ray Jobs entrypoint for a study: named arms x seeds, each (arm, seed) a Ray Train run scheduled as Ray Tune trials.

    ray job submit --working-dir . -- python jobs/study.py --config jobs/configs/study-synth.yaml
    ray job submit --working-dir . -- python jobs/study.py --config jobs/configs/study-synth.yaml --resume
    mtseg submit study --config jobs/configs/study-synth.yaml --wait         # the same, through mtseg
    mtseg study --config jobs/configs/study-synth.yaml                       # the same, in this process

Thin on purpose: parse, call mtseg, exit. A driver that was lost (or a stopped job) is continued
with --resume: finished runs and their evaluations are kept. results.csv, results.json and
report.html land under <train.storage_path>/<study.name>/results/.
"""

import sys

from mtseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
