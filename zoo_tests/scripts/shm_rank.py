"""One rank of a tensor parallel group that all-reduces until something goes wrong (test_shm_collectives).

    python shm_rank.py RANK WORLD INIT_FILE

Prints "ready <pid> <collectives> <segment>" once the group has formed, then all-reduces in a loop.
When a collective raises, prints "raised <seconds since the last good collective> <message>" and exits 3.
The test kills one rank from outside and watches the others.
"""

import os
import sys
import time

import torch
import torch.distributed as dist

from nxd_core import parallel_state as ps
from nxd_core import shm_group
from nxd_core.mappings import reduce_from_tensor_model_parallel_region


def main() -> None:
    rank, world, init_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ps.initialize_model_parallel(world)
    segment = shm_group.segment_name(ps.get_tensor_model_parallel_group().group_name)
    print("ready", os.getpid(), ps.tp_collectives(), segment, flush=True)
    x = torch.ones(2048, dtype=torch.bfloat16)
    last_good = time.monotonic()
    try:
        while True:
            reduce_from_tensor_model_parallel_region(x)
            last_good = time.monotonic()
    except RuntimeError as error:
        print("raised", f"{time.monotonic() - last_good:.3f}", str(error).splitlines()[0], flush=True)
        os._exit(3)  # the process group cannot be left cleanly with a peer gone


if __name__ == "__main__":
    main()
