"""Ray Jobs entrypoint for prediction on image files.

    ray job submit --working-dir . -- python jobs/predict.py --checkpoint s3://bucket/runs/demo s3://bucket/photos/ --out s3://bucket/preds/
    mtseg predict --checkpoint runs/demo/checkpoint_000012 photo.jpg photos/ --out preds/   # the same, in this shell

Thin on purpose: parse, call mtseg, exit. Prediction runs in the job's driver process (on its
GPU when it has one: --device cuda); inputs and --out may be s3:// URIs.
"""

import sys

from mtseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
