"""Ray Jobs entrypoint for training.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/demo.yaml train.epochs=2
    mtseg submit train --config jobs/configs/demo.yaml train.epochs=2   # the same, through mtseg

Thin on purpose: parse, call mtseg, exit. Running it again with the same train.run_name
resumes the run from its latest checkpoint in storage (a lost driver does not restart
training from scratch); --restart starts over.
"""

import sys

from mtseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
