"""Inside a tiny tmpfs (the test mounts it): a save that fits, one that does not, then one that fits again.

Prints one line per step. Usage: full_disk_save.py DIR
"""

import sys

import torch

from nxd_core.checkpoint import load, save

save_dir = sys.argv[1]
save({"model": {"w": torch.full((1024,), 1.0)}, "step": 1}, save_dir)
print("first saved", flush=True)
try:
    save({"model": {"w": torch.randn(1 << 20)}, "step": 2}, save_dir)  # 4 MB into a 1 MB disk
except OSError as exc:
    print(f"second failed: {exc}", flush=True)
state = load(save_dir)
print(f"loaded step {state['step']}", flush=True)
save({"model": {"w": torch.full((2048,), 3.0)}, "step": 3}, save_dir)
print(f"third saved, loaded step {load(save_dir)['step']}", flush=True)
