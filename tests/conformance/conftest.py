"""The zdtm harness lives with the benchmarks (bench/zdtm_suite.py, bench/zdtm_harness.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
