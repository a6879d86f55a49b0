"""The web UI: a chat playground and a live dashboard of the engine, served at `/`.

The page and its scripts are static files in `ui/` next to this module (open, like /health:
they hold no data); everything they show comes from the API itself, from `GET /ui/stats` and
from `GET /ui/vocab`, which need the API key like /v1/*. Every UI response carries a Content-Security-Policy that
allows scripts, styles and connections to this origin only, so neither model output nor
anything else can load code or reach another host.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .serving_engine import APIError

UI_DIR = Path(__file__).with_name("ui")
STATIC_PREFIX = "/ui/static/"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The files the UI may serve, fixed at start: a request names one of these or gets 404.
_FILES = {p.name: p for p in UI_DIR.iterdir() if p.suffix in _TYPES} if UI_DIR.is_dir() else {}

# The server's latency histograms (attributes of metrics.ServerMetrics), under the same keys.
_HISTOGRAMS = ("ttft", "itl", "e2e", "queue")
# get_stats() reads /proc/self/smaps on CPU; several open dashboards share one reading this fresh.
STATS_MAX_AGE_S = 0.2


def is_open_path(path: str) -> bool:
    """Paths the UI serves without the API key: the page and its static files, no data."""
    return path == "/" or (path.startswith(STATIC_PREFIX) and path[len(STATIC_PREFIX):] in _FILES)


def _error(e: APIError) -> JSONResponse:
    # answered here, not raised: the app's handler would count UI polls in request_rejected
    return JSONResponse(e.body(), status_code=e.status, headers={"Cache-Control": "no-store"})


def _file_response(name: str) -> Response:
    path = _FILES.get(name)
    if path is None:
        return _error(APIError(404, f"no UI file {name[:80]!r}", type="not_found_error"))
    return Response(path.read_bytes(), media_type=_TYPES[path.suffix], headers=SECURITY_HEADERS)


def _histogram(hist) -> Dict[str, Any]:
    """A prometheus_client Histogram as cumulative buckets [[le, count], ...], sum and count."""
    out: Dict[str, Any] = {"buckets": [], "sum": 0.0, "count": 0.0}
    for family in hist.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                out["buckets"].append([None if math.isinf(le) else le, s.value])
            elif s.name.endswith("_sum"):
                out["sum"] = s.value
            elif s.name.endswith("_count"):
                out["count"] = s.value
    return out


def _labelled_counter(counter, label: str) -> Dict[str, float]:
    return {s.labels[label]: s.value for family in counter.collect() for s in family.samples
            if s.name.endswith("_total")}


def _json_safe(value: Any) -> Any:
    """get_stats() values made JSON (numbers, strings, lists, dicts; NaN/inf as null)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


class StatsSnapshot:
    """The dashboard's figures: engine stats (the numbers behind /metrics) and the latency histograms."""

    def __init__(self):
        self._body: Optional[bytes] = None
        self._at = 0.0

    def read(self, request: Request) -> bytes:
        now = time.monotonic()
        if self._body is None or now - self._at > STATS_MAX_AGE_S:
            self._body, self._at = self._build(request, now), now
        return self._body

    @staticmethod
    def _build(request: Request, now: float) -> bytes:
        state = request.app.state.server
        serving = state.ready()
        metrics = request.app.state.metrics
        body = {
            "time": now,
            "uptime_s": time.time() - state.started,
            "models": list(serving.served_model_names),
            "max_model_len": serving.max_model_len,
            "engine": _json_safe(state.engine.get_stats() or {}),
            "latency": {name: _histogram(getattr(metrics, name)) for name in _HISTOGRAMS},
            "requests_finished": _labelled_counter(metrics.finished, "finished_reason"),
            "requests_rejected": _labelled_counter(metrics.rejected, "status"),
        }
        return json.dumps(body, separators=(",", ":")).encode()


def make_router() -> APIRouter:
    """`/` (the page), `/ui/static/<file>`, `/ui/stats` and `/ui/vocab`."""
    router = APIRouter()
    snapshot = StatsSnapshot()

    @router.get("/", include_in_schema=False)
    async def index():
        return _file_response("index.html")

    @router.get(STATIC_PREFIX + "{name}", include_in_schema=False)
    async def static_file(name: str):
        return _file_response(name)

    @router.get("/ui/stats")
    async def stats(request: Request):
        """The dashboard's figures as JSON (needs the API key like /v1/*)."""
        try:
            body = snapshot.read(request)
        except APIError as e:   # still loading, or the engine is gone
            return _error(e)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    @router.get("/ui/vocab")
    async def vocab(request: Request):
        """The text of each AdaptiVocab n-token (as logprobs spell tokens), for the UI to highlight;
        empty for a plain tokenizer."""
        try:
            serving = request.app.state.server.ready()
        except APIError as e:
            return _error(e)
        ngrams = getattr(serving.tokenizer, "ngrams", None) or {}
        return {"ntokens": sorted({serving.token_text(token_id, None) for token_id in ngrams})}

    return router
