"""The serving Engine (continuous batching, no HTTP): batch invariance, greedy equal to generate
and to Hugging Face, seeded sampling, stop strings, cancellation, bad input."""

import os
import threading
from pathlib import Path

import pytest
import torch
from llama_fixtures import save_tiny_llama, save_tiny_tokenizer

from nxd_models import from_pretrained_parallel
from nxd_models.generation.worker.sampling import SamplingParams, seeded_generator
from nxd_models.serving import Engine, EngineClosed, EngineFull

# Lengths from 1 to 21 tokens: with prefill_chunk=4 most prompts are prefilled in several pieces.
PROMPTS = [[1, 5], [1, 9, 33, 12, 7, 60, 2 + 40], [1] + list(range(10, 30)), [1, 77, 78], [1, 100, 3, 4, 5, 6, 7, 8, 9], [1]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-serving")
    reference = save_tiny_llama(path, "gqa", initializer_range=0.2)
    save_tiny_tokenizer(path)
    return path, reference


def _load(path, tp, tp_runner, rows=4):
    return from_pretrained_parallel(path, tp=tp, max_batch_size=rows, max_seq_len=64, workers=tp_runner.workers(tp), progress=False)


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_tokens_are_the_same_alone_among_others_in_generate_and_in_hf(tp_runner, checkpoint, tp):
    path, reference = checkpoint
    with _load(path, tp, tp_runner) as model:
        expected = [model.generate(input_ids=[p], max_new_tokens=12, eos_token_id=[], compile=False).tokens[0] for p in PROMPTS]
        with Engine(model, prefill_chunk=4) as engine:
            engine.eos = []  # run every request to max_tokens, so that all rows stay busy
            alone = [engine.generate(p, max_tokens=12).token_ids for p in PROMPTS]
            # Six greedy requests and six sampled ones share four rows: requests wait, come and go.
            sampled = [engine.submit(p, max_tokens=20, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)]
            greedy = [engine.submit(p, max_tokens=12) for p in PROMPTS]
            together = [r.result().token_ids for r in greedy]
            assert all(len(r.result().token_ids) == 20 for r in sampled)
            assert engine.health()["busy_rows"] == 0
    assert together == alone == expected
    for prompt, tokens in zip(PROMPTS, expected):
        with torch.no_grad():
            hf = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert hf[0, len(prompt) :].tolist() == tokens
    assert len({str(t) for t in expected}) == len(PROMPTS), "the answers must tell the prompts apart"


def test_a_compiled_engine_gives_the_eager_tokens_and_compiles_once(tp_runner, checkpoint):
    """Engine(compile=True), what `nxd serve` runs: the decode step is compiled (through this
    machine's compile cache) before the first request; greedy tokens stay those of eager generate,
    alone and among others, and a second engine on the same workers compiles nothing."""
    path, _ = checkpoint
    with _load(path, 2, tp_runner) as model:
        expected = [model.generate(input_ids=[p], max_new_tokens=12, eos_token_id=[], compile=False).tokens[0] for p in PROMPTS]
        with Engine(model, prefill_chunk=4, compile=True) as engine:
            engine.eos = []
            first_report = engine.compile_report
            alone = [engine.generate(p, max_tokens=12).token_ids for p in PROMPTS]
            requests = [engine.submit(p, max_tokens=12) for p in PROMPTS]
            together = [r.result().token_ids for r in requests]
        with Engine(model, compile=True) as engine:
            engine.eos = []
            second_report = engine.compile_report
            again = engine.generate(PROMPTS[2], max_tokens=12).token_ids
    assert first_report["cache"] in ("miss", "hit") and first_report["compile_seconds"] > 0
    assert second_report["cache"] == "process", "the workers hold the compiled step: nothing to compile or load"
    assert together == alone == expected
    assert again == expected[2]
    entries = list((Path(os.environ["NXD_CACHE_DIR"]) / "compiled").glob("*/precompiled-*"))
    assert entries, "the compiled step is kept in the compile cache for the next process"


def test_seeded_sampling_is_the_same_alone_and_among_others_and_differs_between_seeds(tp_runner, checkpoint):
    path, _ = checkpoint
    with _load(path, 2, tp_runner) as model, Engine(model, prefill_chunk=4) as engine:
        engine.eos = []
        alone = [engine.generate(PROMPTS[2], max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=s).token_ids for s in (1, 2)]
        crowd = [engine.submit(p, max_tokens=16, temperature=1.0) for p in PROMPTS[:3]]  # unseeded: the engine picks
        among = [engine.submit(PROMPTS[2], max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=s) for s in (1, 2)]
        assert [r.result().token_ids for r in among] == alone
        assert all(r.result().finish_reason == "length" for r in crowd)
    assert alone[0] != alone[1]


def test_ranks_never_draw_their_own_seed():
    """At tp > 1 every rank must draw the same token; a seed chosen inside a worker would differ."""
    with pytest.raises(ValueError, match="seed"):
        seeded_generator(SamplingParams(do_sample=True), None, "cpu")


def test_stop_strings_end_the_text_before_them(tp_runner, checkpoint):
    path, _ = checkpoint
    with _load(path, 1, tp_runner) as model, Engine(model) as engine:
        engine.eos = []
        full = engine.generate("import os", max_tokens=30)
        stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
        assert stop.strip(), f"pick a visible stop string from {full.text!r}"
        cut = engine.generate("import os", max_tokens=30, stop=[stop])
        streamed = "".join(o.text for o in engine.submit("import os", max_tokens=30, stop=[stop]))
    assert cut.finish_reason == "stop" and full.finish_reason == "length"
    assert cut.text == full.text[: full.text.find(stop)] == streamed
    assert stop not in cut.text


def test_a_cancelled_request_frees_its_row_for_the_next(tp_runner, checkpoint):
    path, _ = checkpoint
    with _load(path, 2, tp_runner, rows=2) as model, Engine(model, max_waiting=1) as engine:
        engine.eos = []
        long = [engine.submit(PROMPTS[0], max_tokens=60), engine.submit(PROMPTS[1], max_tokens=55)]
        waiting = engine.submit(PROMPTS[3], max_tokens=5)
        with pytest.raises(EngineFull, match="retry later"):
            engine.submit(PROMPTS[4], max_tokens=5)
        next(iter(long[0]))  # it is decoding
        long[0].cancel()
        assert waiting.result().finish_reason == "length"
        assert long[0].result().finish_reason == "cancelled"
        assert len(long[0].token_ids) < 60
        assert long[1].result().finish_reason == "length"


def test_bad_requests_are_refused_with_the_reason(tp_runner, checkpoint):
    path, _ = checkpoint
    with _load(path, 1, tp_runner) as model:
        with Engine(model) as engine:
            for options, message in [
                (dict(max_tokens=0), "max_tokens"),
                (dict(max_tokens=64), "exceeds max_seq_len=64"),
                (dict(temperature=-1.0), "temperature"),
                (dict(top_p=0.0), "top_p"),
                (dict(top_k=0), "top_k"),
                (dict(stop=[""]), "stop"),
            ]:
                with pytest.raises(ValueError, match=message):
                    engine.submit([1, 2, 3], **options)
            for prompt, message in [([], "no tokens"), ([1, 999], "outside the vocabulary"), (3.5, "string or a list of token ids")]:
                with pytest.raises(ValueError, match=message):
                    engine.submit(prompt)
            with pytest.raises(RuntimeError, match="serving Engine"):
                model.generate("import os", max_new_tokens=2)  # the engine holds the model: an error, not a wait
        with pytest.raises(EngineClosed):
            engine.submit([1, 2])
        assert len(model.generate("import os", max_new_tokens=3, compile=False).tokens[0]) == 3  # closed: the model is free again


def test_requests_from_many_threads_all_finish(tp_runner, checkpoint):
    path, _ = checkpoint
    results = {}
    with _load(path, 2, tp_runner) as model, Engine(model) as engine:
        engine.eos = []
        expected = {i: engine.generate(PROMPTS[i % len(PROMPTS)], max_tokens=8).token_ids for i in range(len(PROMPTS))}

        def client(i):
            results[i] = engine.generate(PROMPTS[i % len(PROMPTS)], max_tokens=8).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == list(range(16))
    assert all(results[i] == expected[i % len(PROMPTS)] for i in results)
