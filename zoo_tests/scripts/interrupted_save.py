"""Save a small checkpoint, print "first saved", then start a big save into the same directory.

The test kills this process while the second save is writing. Usage: interrupted_save.py DIR
"""

import sys

import torch

from nxd_core.checkpoint import save

save_dir = sys.argv[1]
save({"model": {"w": torch.full((4,), 1.0)}, "step": 1}, save_dir)
print("first saved", flush=True)
big = {f"w{i}": torch.randn(8 << 20) for i in range(48)}  # 1.5 GB: seconds of writing to be killed in
big["w"] = torch.full((4,), 2.0)
save({"model": big, "step": 2}, save_dir)
print("second saved", flush=True)
