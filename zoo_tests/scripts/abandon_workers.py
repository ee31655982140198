"""A front end with no __main__ guard that starts workers, prints their pids, and dies without closing them."""

import os

from nxd_core.workers import WorkerGroup

group = WorkerGroup(2)
assert group.run(os.getpid) == group.pids
print(" ".join(map(str, group.pids)), flush=True)
os._exit(0)
