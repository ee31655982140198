"""Under torchrun: from_pretrained_parallel in SPMD mode, compared with Hugging Face on every rank.

Usage: torchrun ... torchrun_llama.py CHECKPOINT_DIR TP OUT_DIR. Each rank writes OUT_DIR/rank<r>.json.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from nxd_models import from_pretrained_parallel

path, tp = sys.argv[1], int(sys.argv[2])
model = from_pretrained_parallel(path, tp=tp, progress=False)
reference = LlamaForCausalLM.from_pretrained(path).eval()
ids = torch.arange(3, 19).reshape(2, 8)
with torch.no_grad():
    error = (model(ids) - reference(ids).logits).abs().max().item()
rank = torch.distributed.get_rank()
report = {"rank": rank, "world": torch.distributed.get_world_size(), "error": error, "repr": repr(model)}
Path(sys.argv[3], f"rank{rank}.json").write_text(json.dumps(report))
model.close()
torch.distributed.destroy_process_group()
