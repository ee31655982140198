"""`nxd serve` as users run it: a real server process on a free 127.0.0.1 port, talked to with the
official openai client (and raw HTTP for malformed requests); faults, shutdown, nothing left behind."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from nxd_models import from_pretrained_parallel

DEMO = Path(__file__).parent.parent / "nxd_models" / "demo_models" / "demo-llama"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
PROMPTS = ["def f(", "import os\nimport sys\n", "class Reader:\n", "for i in range(", "    if x is None:", "with open(path) as"]


class Server:
    """`nxd serve` in its own process; its log read by a thread (the port, and one line per request)."""

    def __init__(self, model: Path, name: str, *args: str):
        command = [sys.executable, "-m", "nxd_models.cli", "serve", str(model), "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.name = name
        ready = threading.Event()

        def read():
            for line in self.process.stdout:
                self.lines.append(line)
                if "serving" in line and "http://" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(180) or self.process.poll() is not None:
            self.process.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", "".join(self.lines)).group(1))
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)
        self.workers = self.health()[1]["workers"]

    def health(self):
        response = httpx.get(self.url + "/health", timeout=10)
        return response.status_code, response.json()

    def post(self, path: str, body, **kwargs):
        content = body if isinstance(body, str) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers={"content-type": "application/json"}, timeout=60, **kwargs)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """demo-llama with a chat template added."""
    path = tmp_path_factory.mktemp("serve") / "demo-llama-chat"
    shutil.copytree(DEMO, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def expected(tp_runner, chat_model):
    """Each prompt's greedy completion by model.generate (tp=2, the same weights)."""
    with from_pretrained_parallel(chat_model, tp=2, workers=tp_runner.workers(2), max_seq_len=512, progress=False) as model:
        return {p: model.generate(p, max_new_tokens=24, compile=False).texts[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def server(chat_model):
    # Eager steps: its answers are compared token for token with eager generate, and compiled bf16
    # steps round differently (compiled serving steps: the worker-kill test here, and
    # test_serving_engine in fp32, where the tokens must match).
    server = Server(chat_model, chat_model.name, "--tp", "2", "--max-batch-size", "8", "--max-waiting", "64", "--no-compile")
    yield server
    server.stop(signal.SIGKILL if server.process.poll() is None else 0)


def test_completions_greedy_equal_generate_streamed_or_not(server, expected):
    for prompt in PROMPTS[:3]:
        whole = server.client.completions.create(model=server.name, prompt=prompt, max_tokens=24, temperature=0)
        assert whole.choices[0].text == expected[prompt]
        assert whole.choices[0].finish_reason in ("length", "stop")
        assert whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 0
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        chunks = list(server.client.completions.create(model=server.name, prompt=prompt, max_tokens=24, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[prompt]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = server.post("/v1/completions", dict(model=server.name, prompt="def f(", max_tokens=3, stream=True)).text
    assert raw.rstrip().endswith("data: [DONE]")
    assert any(f"{whole.id}:" in line for line in server.lines), "one log line per request, with its id"


def test_chat_completions_use_the_chat_template(server, tp_runner, chat_model):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def f("}]
    prompt = "".join(f"<{m['role']}> {m['content']}\n" for m in messages) + "<assistant> "
    with from_pretrained_parallel(chat_model, tp=2, workers=tp_runner.workers(2), max_seq_len=512, progress=False) as model:
        ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        want = model.tokenizer.decode(model.generate(input_ids=[ids], max_new_tokens=16, compile=False).tokens[0], skip_special_tokens=True)
    reply = server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want
    assert reply.usage.prompt_tokens == len(ids)
    chunks = list(server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.name]
    status, health = server.health()
    assert status == 200 and health["status"] == "ok" and health["rows"] == 8 and len(health["workers"]) == 2


def test_32_concurrent_streaming_clients_each_get_their_own_answer(server, expected):
    results, errors = {}, []

    def client(i):
        try:
            prompt = PROMPTS[i % len(PROMPTS)]
            stream = server.client.completions.create(model=server.name, prompt=prompt, max_tokens=24, temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except Exception as exc:  # reported below, with the others
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sorted(results) == list(range(32)), "no request lost"
    assert all(results[i] == expected[PROMPTS[i % len(PROMPTS)]] for i in results)


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"model": "demo-llama-chat", "prompt": ', "not valid JSON"),
        ({"model": "demo-llama-chat", "prompt": "x", "bogus": 1}, "bogus"),
        ({"model": "demo-llama-chat", "prompt": "x", "max_tokens": "8"}, "max_tokens"),
        ({"model": "demo-llama-chat", "prompt": "x", "max_tokens": -3}, "max_tokens"),
        ({"model": "demo-llama-chat", "prompt": "x", "max_tokens": 10**9}, "exceeds max_seq_len"),
        ({"model": "demo-llama-chat", "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": "demo-llama-chat", "prompt": "x", "n": 3}, "n=3 is not supported"),
        ({"model": "demo-llama-chat", "prompt": ""}, "prompt"),
        ({"model": "demo-llama-chat", "prompt": [1, 10**8]}, "outside the vocabulary"),
        ({"model": "demo-llama-chat"}, "prompt"),
        ([1, 2], "body"),
    ],
)
def test_malformed_requests_are_400_with_the_reason(server, body, message):
    response = server.post("/v1/completions", body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_bad_chat_and_model_names_through_the_client(server):
    with pytest.raises(openai.BadRequestError, match="role"):
        server.client.chat.completions.create(model=server.name, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        server.client.completions.create(model="gpt-9", prompt="x")
    assert server.health()[0] == 200  # none of them hurt the server


def test_a_client_that_goes_away_frees_its_row(server):
    body = dict(model=server.name, prompt="def f(", max_tokens=400, temperature=0, stream=True)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        for _ in response.iter_lines():
            if server.health()[1]["busy_rows"] == 1:
                break
    deadline = time.monotonic() + 10
    while server.health()[1]["busy_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()[1]["busy_rows"] == 0
    assert any("cancelled" in line for line in server.lines)


def test_sigterm_lets_streams_in_flight_finish_then_everything_exits(server):
    """Last in this module: it stops the shared server."""
    body = dict(model=server.name, prompt="import os\n", max_tokens=300, temperature=0, stream=True)
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        for line in filter(None, response.iter_lines()):
            lines.append(line)
            if len(lines) == 3:
                server.process.send_signal(signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: ") :])["usage"]["completion_tokens"] == 300  # the whole answer
    assert server.stop() == 0
    assert not [pid for pid in server.workers if _alive(pid)]
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


def test_a_worker_killed_under_load_fails_requests_with_503_and_health_says_so():
    server = Server(DEMO, "demo-llama", "--tp", "2", "--max-batch-size", "4")  # the default: compiled steps
    try:
        assert any("decode step compiled" in line for line in server.lines), "nxd serve compiles its decode step before serving"
        response = server.post("/v1/chat/completions", dict(model="demo-llama", messages=[{"role": "user", "content": "hi"}]))
        assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]
        outcomes = []

        def client():
            body = dict(model="demo-llama", prompt="def f(", max_tokens=450, temperature=0, stream=True)
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                outcomes.append([line for line in r.iter_lines() if line])

        clients = [threading.Thread(target=client) for _ in range(3)]
        for c in clients:
            c.start()
        while server.health()[1]["busy_rows"] < 3:
            time.sleep(0.02)
        os.kill(server.workers[1], signal.SIGKILL)
        for c in clients:
            c.join(60)
        assert len(outcomes) == 3
        for lines in outcomes:
            assert lines[-1] == "data: [DONE]"
            assert "the model failed" in lines[-2]
        status, health = server.health()
        assert status == 503 and health["status"] == "dead" and "exited" in health["reason"]
        late = server.post("/v1/completions", dict(model="demo-llama", prompt="x", max_tokens=2))
        assert late.status_code == 503
        assert server.stop() == 0
        assert not [pid for pid in server.workers if _alive(pid)]
    finally:
        if server.process.poll() is None:
            server.process.kill()
