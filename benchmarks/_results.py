"""How every benchmark ends: its figures as one JSON line on stdout and in benchmarks/results/."""

from __future__ import annotations

import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(figures: dict, *, out: str | None = None, markdown: str | None = None) -> dict:
    """Print ``figures`` as one JSON line and write them to ``out``.

    Args:
        figures: the benchmark's results; ``figures["benchmark"]`` names the default file.
        out: the JSON file to write (default ``benchmarks/results/<benchmark>.json``).
        markdown: a table of the same figures, written beside it as ``<name>.md``.

    Returns:
        ``figures``, so that ``main`` can end with ``return write_results(...)``.
    """
    out = out or os.path.join(RESULTS_DIR, f"{figures['benchmark']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(figures, f, indent=1)
        f.write("\n")
    if markdown is not None:
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(markdown)
    print(json.dumps(figures))
    return figures
