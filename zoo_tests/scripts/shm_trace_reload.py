"""Load a traced model in a fresh process on the chosen collectives, run it once, report (test_shm_collectives).

    python shm_trace_reload.py FOLDER INPUT.safetensors OUT.json auto|gloo [--compiled]

INPUT holds the tensors "0", "1", ... passed in order. OUT: {"output": first output as nested
lists, "collectives": what each worker's TP group uses}.
"""

import argparse
import json

from safetensors.torch import load_file

from nxd_core import parallel_state as ps
from nxd_core.trace import parallel_model_load
from nxd_core.trace_format import read_manifest
from nxd_core.workers import WorkerGroup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("collectives", choices=["auto", "gloo"])
    parser.add_argument("--compiled", action="store_true")
    args = parser.parse_args()
    tensors = load_file(args.inputs)
    inputs = [tensors[str(i)] for i in range(len(tensors))]
    tp = read_manifest(args.folder)["tp_degree"]
    with WorkerGroup(tp, collectives=args.collectives) as group:
        with parallel_model_load(args.folder, workers=group, compiled=args.compiled) as model:
            output = model(*inputs)[0]
        collectives = group.run(ps.tp_collectives)
    with open(args.out, "w") as f:
        json.dump({"output": output.tolist(), "collectives": collectives}, f)


if __name__ == "__main__":
    main()
