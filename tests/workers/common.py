"""Shared entry for worker modules: parse ``--out``, run checks, write ``rank-<r>.json``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hvd_megdet import dist


def main(run_checks, extra_args=()) -> None:
    """``run_checks(args) -> dict`` runs after ``launch.init`` is left to it; result saved per rank."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    for a in extra_args:
        p.add_argument(a, default=None)
    args = p.parse_args()
    result = run_checks(args)
    Path(args.out, f"rank-{dist.rank()}.json").write_text(json.dumps(result))
