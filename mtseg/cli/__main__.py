"""``python -m mtseg.cli``: the ``mtseg`` command without the console script."""

import sys

from mtseg.cli import main

sys.exit(main())
