"""Load a traced model in a fresh process, run it on saved inputs, write each call's first output as JSON.

    python trace_load_and_run.py FOLDER INPUTS.safetensors OUT.json [--eager]

INPUTS holds tensors named "<call>.<position>" (e.g. "0.0", "0.1", "1.0"): call
c passes its tensors in position order. OUT: {"outputs": [first output of each
call as nested lists], "tp_degree": ...}.
"""

import argparse
import json
from collections import defaultdict

from safetensors.torch import load_file

from nxd_core.trace import parallel_model_load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--eager", action="store_true", help="run the graphs without torch.compile")
    args = parser.parse_args()

    calls = defaultdict(dict)
    for name, tensor in load_file(args.inputs).items():
        call, position = (int(part) for part in name.split("."))
        calls[call][position] = tensor
    with parallel_model_load(args.folder, compiled=not args.eager) as model:
        outputs = [model(*(calls[c][p] for p in sorted(calls[c])))[0] for c in sorted(calls)]
        tp = model.tp_degree
    with open(args.out, "w") as f:
        json.dump({"outputs": [o.tolist() for o in outputs], "tp_degree": tp}, f)


if __name__ == "__main__":
    main()
