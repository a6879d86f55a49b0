"""The OpenAI-compatible HTTP server (FastAPI + uvicorn).

    python -m sarathi.entrypoints.openai.api_server [engine flags] [--host H --port P --api-key K]

uvicorn starts listening at once; the model loads on a worker thread meanwhile, and
/health answers 503 until it is ready (200 after). A client that disconnects has its
request aborted, which frees its KV slot within one engine step.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from sarathi.config import EngineConfig, add_engine_args
from sarathi.engine.engine_client import EngineClient
from sarathi.lora.request import LoRARequest
from sarathi.sampling_params import InvalidParam

from . import ui
from .http_limits import GuardedH11Protocol, RequestLimits
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, FieldError,
                       LoadLoRAAdapterRequest, TokenizeRequest, UnloadLoRAAdapterRequest)
from .serving_chat import OpenAIServingChat, render_messages
from .serving_completion import OpenAIServingCompletion
from .serving_engine import APIError, OpenAIServing, bad_request, internal_error, short
from .tool_calls import PARSERS

TEMPLATES = Path(__file__).resolve().parent / "templates"
SHIPPED_TEMPLATES = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))

logger = logging.getLogger("sarathi.entrypoints.openai")

# Paths anyone may read without the API key (probes and scrapers).
_OPEN_PATHS = {"/health", "/metrics", "/version"}


def version() -> str:
    from sarathi import __version__
    return __version__


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template: a shipped name, a file, or the template text itself (ValueError otherwise)."""
    if value is None:
        return None
    if value in SHIPPED_TEMPLATES:
        return (TEMPLATES / f"{value}.jinja").read_text()
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file, a template nor one of {SHIPPED_TEMPLATES}")


def make_arg_parser() -> argparse.ArgumentParser:
    """Engine flags (sarathi.config, aliases included) plus the server's own."""
    parser = argparse.ArgumentParser(prog="sarathi serve", description="OpenAI-compatible server")
    add_engine_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("SARATHI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize, /ui/stats "
                        "(default $SARATHI_API_KEY)")
    g.add_argument("--max-queue-len", type=int, default=None,
                   help="answer 503 when this many requests (not samples) already wait for the engine")
    g.add_argument("--max-prompt-tokens-per-request", type=int, default=None,
                   help="most prompt tokens one request may carry over all its prompts (400 beyond; default: "
                        "what the KV cache holds)")
    g.add_argument("--max-request-bytes", type=int, default=8 << 20,
                   help="largest request body accepted; 413 beyond it, before parsing (default: 8 MiB)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers (default: 10)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may stall before 408 (default: 30)")
    g.add_argument("--chat-template", default=None,
                   help="chat template to use instead of the model's: a file, the template text, or a shipped one "
                        f"({', '.join(SHIPPED_TEMPLATES)}: ChatML with Hermes-style tool calls)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto": the model calls tools in free text, read by --tool-call-parser')
    g.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                   help="how tool calls are written in the model's text (with --enable-auto-tool-choice)")
    g.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with --enable-lora)")
    g.add_argument("--disable-ui", action="store_true",
                   help="do not serve the web UI (chat playground and dashboard at /, stats at /ui/stats)")
    g.add_argument("--log-prompts", action="store_true", help="include prompt text in the per-request log line")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--access-log", action="store_true", help="also log uvicorn's line per HTTP request")
    return parser


@dataclass
class ServerState:
    """What the handlers need; filled in once the engine has loaded."""

    engine: Optional[EngineClient] = None
    serving: Optional[OpenAIServing] = None
    completion: Optional[OpenAIServingCompletion] = None
    chat: Optional[OpenAIServingChat] = None
    load_error: Optional[str] = None
    started: float = field(default_factory=time.time)

    def ready(self) -> OpenAIServing:
        if self.load_error is not None:
            raise APIError(503, f"model failed to load: {self.load_error}", type="server_unavailable",
                           code="load_failed")
        if self.serving is None:
            raise APIError(503, "model is still loading; retry when /health answers 200",
                           type="server_unavailable", code="loading")
        if self.engine.errored is not None:
            raise APIError(503, "the engine failed and the server is stopping; it must be restarted",
                           type="server_unavailable", code="engine_dead")
        return self.serving


def _state(request: Request) -> ServerState:
    return request.app.state.server


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _validation_error(exc: RequestValidationError, content_type: Optional[str]) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(": "))
    if content_type and "json" not in content_type.lower() and first.get("loc") in (("body",), ["body"]):
        return bad_request(f"the request body must be JSON (Content-Type: application/json), got "
                           f"Content-Type {short(content_type, 60)!r}")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):   # the generic checks every field gets (protocol.check_values)
        return bad_request(str(cause), param=cause.param)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if param == "prompt" and len(errors) > 1:
        # a Union field reports one error per alternative; say what is accepted instead
        return bad_request("prompt must be a string, a list of strings, a list of token ids or a list of "
                           "token-id lists", param="prompt")
    where = ".".join(loc) or "request body"
    return bad_request(f"{where}: {first.get('msg', 'invalid value')}", param=param)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work` but cancel it if the client disconnects first (non-streaming requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()  # cancellation runs the abort in OpenAIServing.generate
        return Response(status_code=499)
    return task.result()


router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request):
    state = _state(request)
    state.ready()
    # 200 while the engine (or at least one replica) serves: "degraded" when some are restarting
    body = state.engine.health()
    return JSONResponse(body, status_code=503 if body["status"] == "down" else 200)


@router.get("/version")
async def get_version():
    return {"version": version()}


@router.get("/metrics")
async def get_metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    s = state.ready()
    base = [{"id": name, "object": "model", "created": int(state.started), "owned_by": "sarathi",
             "root": str(state.engine.model_path), "parent": None,
             "max_model_len": s.max_model_len} for name in s.served_model_names]
    adapters = [{"id": name, "object": "model", "created": int(state.started), "owned_by": "sarathi",
                 "root": state.engine.lora_path(name), "parent": s.served_model_names[0],
                 "max_model_len": s.max_model_len} for name in s.loras()]
    targets = [{"id": name, "object": "model", "created": int(state.started), "owned_by": "sarathi", "root": name,
                "parent": None, "max_model_len": s.max_model_len, "optimal_sampling_target": True}
               for name in state.engine.optimal_sampling_models()]
    return {"object": "list", "data": base + adapters + targets}


def _runtime_lora(request: Request) -> OpenAIServing:
    s = _state(request).ready()
    if not request.app.state.allow_runtime_lora_updating:
        raise APIError(400, "runtime LoRA updating is disabled; start the server with "
                            "--allow-runtime-lora-updating", code="lora_updates_disabled")
    return s


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadLoRAAdapterRequest, request: Request):
    s = _runtime_lora(request)
    if req.lora_name in s.served_model_names:
        raise bad_request(f"{req.lora_name!r} is the base model's name", param="lora_name")
    try:
        await s.engine.add_lora(LoRARequest(req.lora_name, 0, req.lora_path))
    except ValueError as e:
        raise bad_request(str(e), param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadLoRAAdapterRequest, request: Request):
    s = _runtime_lora(request)
    try:
        await s.engine.remove_lora(req.lora_name)
    except KeyError:
        raise APIError(404, f"The LoRA adapter `{short(req.lora_name)}` is not loaded.", param="lora_name",
                       code="model_not_found") from None
    except ValueError as e:
        raise bad_request(str(e), param="lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = _state(request)
    state.ready()
    return await _respond(request, state.completion.create(req), req.stream)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = _state(request)
    state.ready()
    return await _respond(request, state.chat.create(req), req.stream)


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request):
    """vLLM's endpoint: forget every cached prefix (requests in flight keep their KV)."""
    s = _state(request).ready()
    blocks = await s.engine.reset_prefix_cache()
    return {"reset": True, "blocks_forgotten": blocks}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    s = _state(request).ready()
    s.model_name(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        text = await render_messages(s, req.messages, req.add_generation_prompt)
        ids = await s.encode(text, "messages", add_special_tokens=False)
    else:
        ids = await s.encode(req.prompt, "prompt", add_special_tokens=req.add_special_tokens)
    return {"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    s = _state(request).ready()
    s.model_name(req.model)
    try:
        s.limits.check_token_ids(req.tokens, "tokens")
    except InvalidParam as e:
        raise bad_request(str(e), param=e.param) from None
    return {"prompt": await asyncio.to_thread(s.tokenizer.decode, req.tokens)}


def build_app(args: argparse.Namespace, engine_factory: Optional[Callable[[], Any]] = None,
              on_fatal: Optional[Callable[[], None]] = None) -> FastAPI:
    """The FastAPI app; the engine is made by `engine_factory` (default AsyncLLMEngine) on a thread.

    on_fatal runs when the model fails to load or the engine dies: the server should exit
    non-zero so that a supervisor restarts it."""
    state = ServerState()
    metrics = ServerMetrics(lambda: state.engine.get_stats() if state.engine is not None else None)

    if engine_factory is None:
        config = EngineConfig.from_cli_args(args)

        def engine_factory():
            if config.parallel_config.distributed_executor_backend == "ray":
                from sarathi.engine.ray_client import RayDataParallelClient
                return RayDataParallelClient(config)
            from sarathi.engine.async_llm_engine import AsyncLLMEngine
            return AsyncLLMEngine(config)

    def engine_died(error: BaseException) -> None:
        logger.error("the engine died (%s); stopping the server", type(error).__name__)
        if on_fatal is not None:
            on_fatal()

    async def load_engine() -> None:
        t0 = time.perf_counter()
        try:
            engine = await asyncio.to_thread(engine_factory)
            names = [args.served_model_name or engine.model_name]
            serving = await asyncio.to_thread(
                OpenAIServing, engine, names, metrics, args.max_queue_len, args.log_prompts,
                args.max_prompt_tokens_per_request,
                chat_template=load_chat_template(getattr(args, "chat_template", None)),
                tool_call_parser=args.tool_call_parser if getattr(args, "enable_auto_tool_choice", False) else None)
        except Exception as e:  # noqa: BLE001 - reported on /health and in the log, then we exit
            logger.exception("model failed to load")
            state.load_error = f"{type(e).__name__}: {e}"
            if on_fatal is not None:
                on_fatal()
            return
        engine.on_dead.append(engine_died)
        state.engine = engine
        state.completion, state.chat = OpenAIServingCompletion(serving), OpenAIServingChat(serving)
        state.serving = serving
        logger.info("model %s ready in %.1fs (max_model_len %d)", names[0], time.perf_counter() - t0,
                    serving.max_model_len)
        so = (engine.get_stats() or {}).get("structured_outputs") or {}
        logger.info("structured outputs: backend %s; tool calls: %s", so.get("backend", "?"),
                    f"auto with the {serving.tool_call_parser} parser" if serving.tool_call_parser
                    else 'required / named function (start with --enable-auto-tool-choice for "auto")')

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load_engine())
        yield
        loader.cancel()
        if state.engine is not None:
            await state.engine.shutdown()

    app = FastAPI(title="sarathi-vattn OpenAI-compatible server", version=version(), lifespan=lifespan)
    app.state.server = state
    app.state.metrics = metrics
    app.state.allow_runtime_lora_updating = bool(getattr(args, "allow_runtime_lora_updating", False))
    app.include_router(router)
    ui_enabled = not getattr(args, "disable_ui", False)
    if ui_enabled:
        app.include_router(ui.make_router())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.rejected.labels(str(exc.status)).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.rejected.labels("400").inc()
        return error_response(_validation_error(exc, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error_response(internal_error())

    if args.api_key:
        expected = args.api_key.encode()

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            path = request.url.path
            if request.method != "OPTIONS" and path not in _OPEN_PATHS and not (ui_enabled and ui.is_open_path(path)):
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                # the scheme is case-insensitive (RFC 9110); the key is compared in constant time
                if not (hmac.compare_digest(token.strip().encode(), expected) and scheme.lower() == "bearer"):
                    return error_response(APIError(401, "invalid or missing API key (send 'Authorization: "
                                                        "Bearer KEY')", code="invalid_api_key"))
            return await call_next(request)

    app.add_middleware(RequestLimits, max_bytes=args.max_request_bytes, body_timeout=args.body_timeout)
    return app


async def _respond(request: Request, created: Awaitable[Any], stream: bool):
    if not stream:
        return await _until_disconnect(request, created)
    # validation errors surface here, before the 200 and the first SSE byte
    chunks = await created
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def run_server(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the process exit status (1 if the engine failed)."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed: List[bool] = []
    server: Optional[uvicorn.Server] = None

    def stop_on_failure() -> None:
        failed.append(True)
        if server is not None:
            server.should_exit = True

    app = build_app(args, on_fatal=stop_on_failure)
    GuardedH11Protocol.header_timeout = args.header_timeout
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=args.access_log, timeout_keep_alive=30,
                                           http=GuardedH11Protocol))
    logger.info("sarathi %s serving on http://%s:%d (model loading in the background)", version(),
                args.host, args.port)
    server.run()
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> None:
    # libgomp's default lets idle OpenMP workers spin; on a shared CPU they burn the time the other
    # thread needs (one decode-sized matmul: 16-18 ms spinning vs 0.85 ms sleeping, 2 cores with other
    # jobs running). Sleep instead unless the user chose a policy. Must happen before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = make_arg_parser()
    args = parser.parse_args(argv)
    for name in ("max_queue_len", "max_prompt_tokens_per_request"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_request_bytes", "header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser")
    try:
        load_chat_template(args.chat_template)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        EngineConfig.from_cli_args(args)
    except (ValueError, TypeError, OSError) as e:
        parser.error(str(e))
    sys.exit(run_server(args))


if __name__ == "__main__":
    main()
