"""`nxd serve`: the OpenAI HTTP API (FastAPI on uvicorn) in front of a serving Engine.

POST /v1/completions and /v1/chat/completions (stream: server-sent events ending with
`data: [DONE]`), GET /v1/models and /health. Bad requests are 4xx with OpenAI's error body; a
client that goes away frees its row at the next step; SIGINT or SIGTERM lets the requests in
flight finish, then the workers exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Engine, EngineClosed, EngineDead, EngineError, EngineFull
from .protocol import ChatRequest, CompletionRequest

log = logging.getLogger("nxd.serve")
DISCONNECT_POLL_SECONDS = 0.1  # how often a non-streaming request checks that its client is still there


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, first = [], None
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')} at character {e['loc'][-1]})", None
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        first = first or where or None
        problems.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(problems[:5]) or "invalid request body", first


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The API for one engine, serving it under model_name."""
    app = FastAPI(title="nxd serve", docs_url=None, redoc_url=None)
    created = int(time.time())
    tokenizer = engine.tokenizer

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error(400, message, param=param)

    @app.get("/health")
    async def health():
        state = engine.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        card = dict(id=model_name, object="model", created=created, owned_by="nxd-zoo", max_model_len=engine.model.max_seq_len)
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        if body.model != model_name:
            return error(404, f"model {body.model!r} is not served here; this server serves {model_name!r}", "not_found_error", "model")
        prompts = body.prompts()
        if any(isinstance(p, str) for p in prompts) and tokenizer is None:
            return error(400, f"{model_name} has no tokenizer: send the prompt as token ids", param="prompt")
        return await _respond(body, http, prompts, body.max_tokens or 16, "cmpl", chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        if body.model != model_name:
            return error(404, f"model {body.model!r} is not served here; this server serves {model_name!r}", "not_found_error", "model")
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return error(400, f"{model_name}'s tokenizer has no chat template: use /v1/completions with a prompt", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template rejects the conversation (say, roles out of order)
            return error(400, f"the chat template rejects these messages: {exc}", param="messages")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = body.limit() or max(engine.model.max_seq_len - len(ids), 1)
        return await _respond(body, http, [ids], limit, "chatcmpl", chat=True)

    async def _respond(body, http: Request, prompts: list, max_tokens: int, prefix: str, chat: bool):
        loop = asyncio.get_running_loop()
        response_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        requests = []
        try:
            for i, prompt in enumerate(prompts):
                suffix = f"-{i}" if len(prompts) > 1 else ""
                requests.append(engine.submit(prompt, request_id=response_id + suffix, loop=loop, **body.options(max_tokens)))
        except (ValueError, EngineError) as exc:  # the prompts taken so far are cancelled: all or nothing
            _cancel(requests)
            status, kind = next(refusal for cls, refusal in _REFUSED.items() if isinstance(exc, cls))
            return error(status, str(exc), kind)
        shape = _Shape(response_id, model_name, chat)
        if body.stream:
            return StreamingResponse(_events(requests, shape), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(requests, shape, http)

    return app


# Why submit refused a request -> its HTTP status and OpenAI error type.
_REFUSED = {
    ValueError: (400, "invalid_request_error"),
    EngineFull: (429, "rate_limit_error"),
    EngineClosed: (503, "service_unavailable"),
    EngineDead: (503, "service_unavailable"),
}


def _cancel(requests) -> None:
    for request in requests:
        request.cancel()


class _Shape:
    """OpenAI's response objects for completions and chat completions."""

    def __init__(self, response_id: str, model: str, chat: bool):
        self.id, self.model, self.chat, self.created = response_id, model, chat, int(time.time())

    def _object(self, kind: str, choices: list, usage=None) -> dict:
        body = dict(id=self.id, object=kind, created=self.created, model=self.model, choices=choices)
        if usage is not None:
            body["usage"] = usage
        return body

    def whole(self, requests) -> dict:
        choices = []
        for i, r in enumerate(requests):
            if self.chat:
                choices.append(dict(index=i, message=dict(role="assistant", content=r.text), finish_reason=r.finish_reason, logprobs=None))
            else:
                choices.append(dict(index=i, text=r.text, finish_reason=r.finish_reason, logprobs=None))
        return self._object("chat.completion" if self.chat else "text_completion", choices, usage(requests))

    def chunk(self, index: int, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = dict(index=index, delta=delta, finish_reason=finish_reason, logprobs=None)
            return self._object("chat.completion.chunk", [choice])
        return self._object("text_completion", [dict(index=index, text=text or "", finish_reason=finish_reason, logprobs=None)])

    def usage_chunk(self, requests) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [], usage(requests))


def usage(requests) -> dict:
    prompt, completion = sum(r.prompt_tokens for r in requests), sum(r.completion_tokens for r in requests)
    return dict(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _merged(requests):
    """(index, output) of every request as they come."""
    if len(requests) == 1:
        async for output in requests[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, request):
        async for output in request:
            await queue.put((i, output))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        done = 0
        while done < len(requests):
            i, output = await queue.get()
            done += output.finish_reason is not None
            yield i, output
    finally:
        for task in tasks:
            task.cancel()


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(requests, shape: _Shape):
    """The server-sent events of a streamed response; a client that leaves cancels its requests."""
    try:
        if shape.chat:
            yield _sse(shape.chunk(0, None, None, first=True))
        failed = None
        async for index, output in _merged(requests):
            if output.finish_reason == "error":
                failed = output.error
                continue
            if output.text or output.finish_reason:
                yield _sse(shape.chunk(index, output.text, output.finish_reason))
        if failed:
            yield _sse({"error": {"message": f"the model failed while generating: {failed}", "type": "server_error", "code": 503}})
        else:
            yield _sse(shape.usage_chunk(requests))
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (the response task is cancelled)
        _cancel([r for r in requests if not r.finished])


async def _whole(requests, shape: _Shape, http: Request):
    """A non-streamed response, once every choice has finished; a client that leaves cancels them."""
    collect = asyncio.ensure_future(_collect(requests))
    try:
        while not collect.done():
            await asyncio.wait([collect], timeout=DISCONNECT_POLL_SECONDS)
            if not collect.done() and await http.is_disconnected():
                _cancel(requests)
        await collect
    finally:
        _cancel([r for r in requests if not r.finished])
    failed = [r.error for r in requests if r.finish_reason == "error"]
    if failed:
        return error(503, f"the model failed while generating: {failed[0]}", "service_unavailable")
    return shape.whole(requests)


async def _collect(requests) -> None:
    async for _ in _merged(requests):
        pass


def serve(
    model: str,
    *,
    tp: int = 1,
    max_batch_size: int = 8,
    max_seq_len: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype=None,
    compile: bool = True,
    max_waiting: int = 256,
    drain_seconds: float = 30.0,
    served_name: str | None = None,
    quantize: str | None = None,
    quantize_lm_head: bool = False,
) -> None:
    """Load model, serve it until SIGINT/SIGTERM, let the requests in flight finish, close the workers."""
    import uvicorn

    from .. import from_pretrained_parallel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loading = dict(
        tp=tp, max_batch_size=max_batch_size, max_seq_len=max_seq_len, dtype=dtype, quantize=quantize, quantize_lm_head=quantize_lm_head
    )
    with from_pretrained_parallel(model, **loading) as handle:
        engine = Engine(handle, max_waiting=max_waiting, compile=compile)
        try:
            # A directory is served under its name (clients send it as `model`), a zoo or hub name as typed.
            served_name = served_name or (Path(model).name if Path(model).is_dir() else model)
            app = create_app(engine, served_name)
            config = uvicorn.Config(
                app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=drain_seconds, lifespan="off"
            )
            server = uvicorn.Server(config)
            listener = socket.create_server((host, port))  # bound here, so that port 0 (any free port) can be logged
            port = listener.getsockname()[1]
            log.info(
                "serving %s as %r (tp=%d, %d rows, max_seq_len=%d) on http://%s:%d",
                model,
                served_name,
                tp,
                max_batch_size,
                handle.max_seq_len,
                host,
                port,
            )
            # uvicorn drains on SIGINT/SIGTERM, then raises the signal again once it has stopped: as
            # an exception here (not the default handler's sudden exit) so that the workers are closed.
            previous = signal.signal(signal.SIGTERM, _raise_stopped)
            try:
                server.run(sockets=[listener])
            except (_Stopped, KeyboardInterrupt):
                log.info("stopping: the requests in flight have finished")
            finally:
                signal.signal(signal.SIGTERM, previous)
        finally:
            engine.close(drain=False)
    log.info("stopped: the workers have exited")


class _Stopped(Exception):
    """SIGTERM, after uvicorn has drained."""


def _raise_stopped(signum, frame):
    raise _Stopped
