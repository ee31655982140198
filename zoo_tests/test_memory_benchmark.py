"""benchmarks/memory.py keeps working (tiny layouts) and shows each rank holding about 1/tp of the weights."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_memory_prints_per_rank_bytes_near_one_over_tp():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "memory.py"), "--tp", "2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"bert", "t5"}
    # T5 is all sharded but its layer norms; tiny BERT replicates a 512-position table and its heads.
    assert 0.49 < float(rows["t5"][4]) < 0.52
    assert 0.5 < float(rows["bert"][4]) < 0.65
