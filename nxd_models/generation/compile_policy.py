"""When a generation switches to compiled steps: only where it pays, so compiling never makes a run slower.

A generation starts eagerly at once. At each chunk boundary the front end compares what compiling
would cost (from this machine's compile cache: the last warm compile of this very step, or a cold
estimate) with what it would save over the tokens still to come (the eager step just measured,
minus the compiled step recorded for this step, or a guess), and switches every rank at the same
step when the saving is larger. Greedy tokens are the same whichever step made them.

The cache (nxd_core.compile_cache) is keyed by the fields below plus torch's version and the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

from nxd_core import compile_cache

# Before this machine has measured a step: what compiling costs cold, and what it saves per step
# (it removes Python's dispatch, roughly constant per layer; it cannot make weights load faster).
# Measured on a 2-core VM (demo model, 20M and 1.1B layouts): cold 10-50 s; saves 0.15-0.35 ms per layer.
COLD_SECONDS_BASE, COLD_SECONDS_PER_LAYER = 10.0, 1.5
SAVED_PER_LAYER_STEP = 0.2e-3
# A warm compile (the cache has the step) costs about this fraction of a cold one until measured:
# torch.compile with warm caches still traces (a quarter); a precompiled step is only loaded
# (measured 0.07-0.09 of the cold compile on a 2-core VM, demo model at tp=2).
WARM_FRACTION = 0.25
PRECOMPILED_WARM_FRACTION = 0.1
# An AOTInductor package loads in milliseconds (timed when it is compiled); the first step in a new
# process and the switch's round trip come on top (measured under 0.1 s).
PACKAGE_LOAD_MARGIN = 0.1
# A switch must save more than this many times its estimated cost, plus SWITCH_SECONDS (the switch's
# round trip, the first compiled step): a precompiled step loads in a tenth of a second, about what a
# 96-token run of the demo model could save, so an estimate off by a little would make a short run
# slower than eager; the margin costs a long run at most a few tenths of a second of saving.
SWITCH_MARGIN, SWITCH_SECONDS = 1.5, 0.05
# The eager step's time is trusted from a chunk of at least this many steps.
MEASURED_STEPS = 16


# The environment switches that choose which C++ kernels a traced step calls (each worker reads them).
KERNEL_SWITCHES = ("NXD_BF16_KERNEL", "NXD_INT8_KERNEL", "NXD_INT4_KERNEL", "NXD_ATTENTION_KERNEL")


@functools.cache
def code_digest() -> str:
    """The package's Python sources: a compiled step is only as good as the code it was traced from."""
    digest = hashlib.sha256()
    for package in (Path(__file__).parents[1], Path(compile_cache.__file__).parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def step_fields(model, step: str, batch: int) -> dict:
    """What a compiled decode step of this model depends on (the cache key, less torch and the CPU)."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(volatile, None)
    return {
        "step": step,
        "config": hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:16],
        "dtype": str(model.dtype),
        "quantize": getattr(model, "quantize", None),
        "tp": model.tp,
        "layers": getattr(model.config, "num_hidden_layers", 1),
        "batch": batch,
        "max_seq_len": model.max_seq_len,
        "code": code_digest(),
        "kernels": {name: os.environ[name] for name in KERNEL_SWITCHES if name in os.environ},
    }


def speculative_rounds_name(model, draft, sampled: bool, k: int, batch: int) -> str:
    """What a speculative session's compiled rounds are known by in model.compiled_steps."""
    proposer = "lookup" if draft is None else f"draft {draft.key.owner} tp {draft.tp}"
    fields = step_fields(model, f"speculative rounds: {proposer}, k {k}, {'sampled' if sampled else 'greedy'}", batch)
    return compile_cache.entry_dir(compile_cache.full_key(fields)).name


def speculative_fields(model, draft, sampled: bool, k: int, batch: int) -> dict[str, dict]:
    """The compile cache fields of each function a speculative session compiles (worker/speculative.py):
    the draft's k-step round (greedy) or its forward (sampled), the target's verification (greedy: with
    its acceptance) or forward (sampled), and prompt lookup's plain step (plain decoding's own)."""
    mode = "sampled" if sampled else "greedy"
    fields = {"verify" if not sampled else "target": step_fields(model, f"speculative {mode} verification of {k} tokens", batch)}
    if draft is not None:
        fields["draft"] = step_fields(draft, f"speculative {mode} draft of {k} tokens", batch)
    else:
        fields["plain"] = step_fields(model, "sampled_compute" if sampled else "greedy_step", batch)
    return fields


class CompilePolicy:
    """compile=None's decision for one generation: switch once, at the first boundary where it pays.
    force=True (compile=True) switches at the first boundary whatever the estimate."""

    def __init__(self, model, step: str, batch: int, max_new_tokens: int, force: bool = False):
        self.fields = step_fields(model, step, batch)
        self.layers = self.fields["layers"]
        self.max_new_tokens, self.force = max_new_tokens, force
        key = compile_cache.full_key(self.fields)
        self.name = compile_cache.entry_dir(key).name
        # the workers keep a compiled step for their process's life: the handle remembers which
        self.in_workers = self.name in model.compiled_steps
        self.entry = None if self.in_workers else compile_cache.lookup(key)
        self.switched = False
        self._cold = None  # the cold estimate, once asked for (it reads every entry)

    def compile_seconds(self) -> float:
        if self.in_workers:
            return 0.0
        info = self.entry.info if self.entry is not None and self.entry.has_artifacts else None
        if info and "warm_seconds" in info:
            return info["warm_seconds"]
        if info and "package_load_seconds" in info:  # an AOTInductor package, whose load was timed when compiled
            return PACKAGE_LOAD_MARGIN + info["package_load_seconds"]
        if info and "cold_seconds" in info:
            return (PRECOMPILED_WARM_FRACTION if info.get("precompiled") else WARM_FRACTION) * info["cold_seconds"]
        return self._cold_estimate()

    def _cold_estimate(self) -> float:
        """This machine's cold compiles of other steps, scaled by layers; else the constants."""
        if self._cold is None:
            self._cold = self._estimate_cold()
        return self._cold

    def _estimate_cold(self) -> float:
        per_layer = [e.info["cold_seconds"] / e.key.get("layers", self.layers) for e in compile_cache.entries() if "cold_seconds" in e.info]
        if per_layer:
            return sorted(per_layer)[len(per_layer) // 2] * self.layers
        return COLD_SECONDS_BASE + COLD_SECONDS_PER_LAYER * self.layers

    def saved_per_step(self, eager_step: float) -> float:
        """Seconds a compiled step saves: what the workers measured for this key (both steps timed the
        same way, inside the worker), else a guess; never more than the eager step measured now."""
        info = self.entry.info if self.entry is not None else {}
        if "eager_step_seconds" in info and "compiled_step_seconds" in info:
            return min(eager_step, max(0.0, info["eager_step_seconds"] - info["compiled_step_seconds"]))
        return min(eager_step / 2, SAVED_PER_LAYER_STEP * self.layers)

    def switch_now(self, produced: int, eager_step: float | None) -> bool:
        """Whether to compile before the next chunk: produced tokens so far (per row, the most), the
        eager step's seconds measured on a chunk of at least MEASURED_STEPS (None before that:
        a chunk of one step is mostly its round trip, and once switched the generation into a run
        1.8x slower than eager)."""
        if self.switched:
            return False
        if self.force:
            self.switched = self.max_new_tokens - produced >= 2
            return self.switched
        if eager_step is None:
            return False
        remaining = self.max_new_tokens - produced
        if remaining < 2:
            return False
        cost = self.compile_seconds()
        if cost > 0:  # a compile or a load to come: its estimate with a margin (see SWITCH_MARGIN)
            cost = SWITCH_MARGIN * cost + SWITCH_SECONDS
        if remaining * self.saved_per_step(eager_step) > cost:
            self.switched = True
            return True
        return False

    def notice(self) -> str:
        """One line for the user before compiling or loading, with the estimate (a step the workers
        hold compiled already switches silently: announce)."""
        what = f"the decode step (batch {self.fields['batch']}, tp {self.fields['tp']}, {self.fields['dtype'].removeprefix('torch.')})"
        if self.entry is not None and self.entry.has_artifacts:
            return f"nxd-zoo: loading {what} from this machine's compile cache: ~{_seconds(self.compile_seconds())}"
        return (
            f"nxd-zoo: compiling {what}, once per machine: ~{self.compile_seconds():.0f} s, kept in {compile_cache.cache_root()} "
            "(as the C++ kernels' builds are kept in torch's extension cache)"
        )

    def announce(self) -> None:
        """The notice on stderr when there is something to wait for (a compile or a cache load; a
        step these workers compiled before switches at once, silently: a notebook's every call
        would print it); under torchrun only the first rank says it."""
        import torch.distributed as dist

        if self.in_workers:
            return
        if not (dist.is_initialized() and dist.get_rank() != 0):
            print(self.notice(), file=sys.stderr, flush=True)


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
