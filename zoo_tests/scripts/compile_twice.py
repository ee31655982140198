"""One process of the compile cache test: load a tiny Llama at tp=1, generate eagerly and with compile=True,
print what the compile cache did (the test runs this several times with the same NXD_CACHE_DIR; the
worker's warnings go to stderr)."""

import json
import sys

from nxd_models import from_pretrained_parallel


def counters():
    from nxd_core import compile_cache

    return dict(compile_cache.counters)


with from_pretrained_parallel(sys.argv[1], tp=1, max_batch_size=1, max_seq_len=32, progress=False) as model:
    eager = model.generate(input_ids=[[1, 5, 9]], max_new_tokens=8, compile=False)
    result = model.generate(input_ids=[[1, 5, 9]], max_new_tokens=8, compile=True)
    report = {key: result.stats.get(key) for key in ("compile_cache", "compile_precompiled", "compiled_from_token")}
    print(json.dumps({"tokens": result.tokens, "eager_tokens": eager.tokens, **report, "worker_counters": model.run(counters)}))
