"""Kairos's HTTP API: a Ray Serve deployment with a FastAPI ingress, under ``/v1``.

``POST /v1/events``       a batch of events (msgpack or JSON) -> 202 with accepted/rejected
``POST /v1/decide``       inbound next best action for a customer on a channel, now
``POST /v1/customers/lookup`` the golden record, from the owning shard (the id in the body)
``GET|PUT /v1/rules``     the running rules; a PUT swaps them (an invalid one changes nothing)
``GET|PUT /v1/offers``    the running offer catalog, likewise
``GET /v1/reference``     the reference tables' version and rows; ``GET|PUT
                          /v1/reference/{name}`` one table's rows; a PUT replaces it (JSON, YAML,
                          CSV or Parquet; validated whole with the others, else nothing changes)
``GET  /v1/stats``        ingest and engine counters
``GET  /healthz``, ``GET /readyz``; OpenAPI at ``/openapi.json``, docs at ``/docs``.

Every call but the health checks needs an API key with the route's scope (``deploy.security``);
reads of golden records, decisions and changes of rules and offers go to the audit trail.

API replicas decode, coerce and validate bodies in parallel and publish each request's valid
events to the durable ingest log (NATS JetStream, ``actors.ingestlog``): a 202 means JetStream
has them. The gateway actor (``actors.gateway``) reads the log in order into the engine. While
the engine is more than ``max_lag_messages`` behind the log, or the log cannot take more, new
events get 503 with ``Retry-After``; so does every call while the engine recovers. Decisions
and golden-record reads go straight to the owning shard actor.
"""

import asyncio
import hashlib
import json
import logging
import secrets
import time
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
import ray
import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.gateway import GatewayActor
from actors.ingestlog import LOG_ERRORS, IngestLog
from actors.metrics import metrics
from deploy.security import AuthMiddleware, Guard, KeyRateLimits, install
from deploy.service import ServiceConfig
from engine.decision.catalog import NO_ACTION
from engine.decision.scorer import RANKER_APP
from engine.errors import EventError, PayloadTooLargeError
from engine.events.codec import decode_json, decode_msgpack, event_id_from_text, rows_to_batch
from engine.events.schema import CHANNELS, KIND_NAMES, PAYLOAD_FIELDS
from engine.events.validation import conform, validate
from engine.gateway import (
    API_BUSY_EXPIRES_S,
    API_BUSY_RETOLD_S,
    accepted_by_kind,
    letter_json,
    rejected_by_kind,
)
from engine.governance.keys import RESTRICTED_KINDS, Principal
from engine.ingest import Ingestor, keyed
from engine.limits import (
    MAX_DOCUMENT_BYTES,
    MAX_DOCUMENT_DEPTH,
    MAX_ERRORS_LISTED,
    MAX_EVENTS_PER_REQUEST,
    MAX_ID_CHARS,
    MAX_REFERENCE_BYTES,
    TS_RANGE_TEXT,
    depth_over,
    time_in_range,
)
from engine.logformat import encode_decisions, encode_message
from engine.reference import (
    TABLE_NAMES,
    ReferenceDataError,
    UnreadableTableError,
    read_table,
    validate_table,
)
from engine.state.store import PROFILE_COLUMNS
from engine.yamlfile import DocumentLimitError, load_yaml
from models.loopback import confine_serve_grpc

log = logging.getLogger("ray.serve")
API_APP = "kairos"
API_DEPLOYMENT = "api"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/plain")
CSV_TYPES = ("text/csv", "application/csv")
PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet")
#: a reference table's content type -> its format (``engine.reference.read_table``)
REFERENCE_FORMATS = {
    **dict.fromkeys(JSON_TYPES, "json"),
    **dict.fromkeys(YAML_TYPES, "yaml"),
    **dict.fromkeys(CSV_TYPES, "csv"),
    **dict.fromkeys(PARQUET_TYPES, "parquet"),
}

# -- the API's documents ---------------------------------------------------------------------
_PY_TYPES: dict[str, Any] = {"double": float, "string": str, "bool": bool, "int8": int}


def _payload_type(name: str) -> Any:
    typ = str(PAYLOAD_FIELDS[name])
    if typ.startswith("list"):
        return list[str] | None
    return _PY_TYPES.get(typ, int) | None


WireEvent = create_model(  # type: ignore[call-overload]
    "WireEvent",
    __config__=ConfigDict(extra="forbid"),
    event_id=(int | str, Field(description="Unique per event: a 64-bit integer or a string.")),
    customer_id=(str, Field(description="The customer's identifier (pseudonymized on entry).")),
    kind=(Literal[KIND_NAMES], Field(description="What happened.")),
    ts=(int | datetime, Field(description="Event time: epoch ms or ISO-8601 with a zone.")),
    **{name: (_payload_type(name), None) for name in PAYLOAD_FIELDS},
)


class EventErrorItem(BaseModel):
    index: int = Field(description="Position of the event in the request's batch.")
    event_id: int | None = None
    kind: str | None = None
    field: str | None = Field(None, description="The field that is wrong.")
    value: str | None = Field(None, description="Its value, as text.")
    reason: str


class IngestReport(BaseModel):
    accepted: int
    rejected: int = Field(description="Every rejected event, counted.")
    errors: list[EventErrorItem] = Field(
        description=f"The first {MAX_ERRORS_LISTED} rejected events, by index in the request."
    )
    errors_truncated: bool = Field(description="More events were rejected than are listed.")
    batch_id: str | None = Field(
        None,
        description="The batch's id in the ingest log: the Idempotency-Key header, else the "
        "SHA-256 of the body. A batch sent again is stored once.",
    )
    sequence: int | None = Field(None, description="Its position in the ingest log.")
    duplicate: bool = Field(False, description="The log already had this batch: not added.")


#: an RFC 3339 date-time (ISO 8601 with T and a zone), its year safely inside the accepted
#: range (1971 .. 2189)
TS_PATTERN = (
    r"^(197[1-9]|19[89][0-9]|20[0-9]{2}|21[0-8][0-9])-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
    r"(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9])$"
)


def _unicode(value: str | None) -> str | None:
    """Text UTF-8 can carry (JSON can hold lone surrogates; identifiers are hashed as UTF-8)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return value


#: a text field of a request: UTF-8-encodable
Text = Annotated[str, AfterValidator(_unicode)]


class DecideContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    page: Text | None = Field(
        None,
        max_length=2048,
        description="The page or screen the customer is on; offer eligibility can use it as "
        "`page`.",
    )
    ts: str | None = Field(
        None,
        pattern=TS_PATTERN,
        json_schema_extra={"format": "date-time"},
        description="Time of the request, ISO 8601 with a zone (default: now), within "
        f"{TS_RANGE_TEXT}.",
    )

    @field_validator("ts")
    @classmethod
    def _in_range(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                raise ValueError("not an ISO 8601 date-time") from None
            if moment.tzinfo is None:
                raise ValueError("has no time zone (add Z or an offset)")
            if not time_in_range(round(moment.timestamp() * 1000)):
                raise ValueError(f"is outside {TS_RANGE_TEXT}")
        return value

    def ts_ms(self) -> int:
        """The request's time in epoch ms (now when it gave none)."""
        if self.ts is None:
            return int(time.time() * 1000)
        return round(datetime.fromisoformat(self.ts).timestamp() * 1000)


class DecideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: Annotated[Text, Field(min_length=1, max_length=MAX_ID_CHARS)]
    channel: Literal[CHANNELS]  # type: ignore[valid-type]
    context: DecideContext = Field(default_factory=DecideContext)
    request_id: Annotated[Text | None, Field(max_length=MAX_ID_CHARS)] = Field(
        None, description="Idempotency: a retried request with the same id gets the same draws."
    )


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: Annotated[Text, Field(min_length=1, max_length=MAX_ID_CHARS)]


class Candidate(BaseModel):
    offer_id: str
    propensity: float | None
    expected_value: float | None
    excluded: str | None = Field(description="Policy reason it was not a candidate, or null.")


class DecideResponse(BaseModel):
    decision_id: str = Field(description="Quote it in the offer_response event.")
    customer_id: str
    action: str = Field(description=f"An offer id, or {NO_ACTION}.")
    channel: str | None
    reason: str = Field(description="offer, no_candidate, no_positive_value, explored, "
                        "no_action_arm, control_group, model_unavailable")  # fmt: skip
    delivered: bool = Field(description="False for NO_ACTION and for the control group.")
    control: bool
    explored: bool
    probability: float = Field(description="Probability of the action under the policy.")
    propensity: float | None = Field(
        description="The model's probability that the customer accepts the offer (null for "
        "NO_ACTION)."
    )
    model_version: str | None
    candidates: list[Candidate]


class Problems(BaseModel):
    detail: str
    errors: list[str] = Field(default_factory=list, description="Every problem found.")


def _document_responses(invalid: str) -> dict[int | str, dict[str, Any]]:
    """What a document-taking endpoint (PUT rules, offers) answers besides 200."""
    return {
        400: {"description": "The body does not parse as JSON or YAML."},
        413: {"description": f"The document is over {MAX_DOCUMENT_BYTES:,} bytes."},
        415: {"description": "Another content type than JSON or YAML."},
        422: {"model": Problems, "description": f"Invalid: {invalid}."},
    }


# -- helpers ---------------------------------------------------------------------------------
def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _body(request: Request, limit: int, name: str = "max_body_bytes") -> bytes:
    """The body, refused with 413 (naming the limit) before it is read when it declares more
    than ``limit`` bytes, and after it is read when it turns out larger."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is None or size <= limit:
        body = await request.body()
        size = len(body)
    if size > limit:
        raise HTTPException(
            413, f"body of {size:,} bytes is over the limit of {limit:,} bytes ({name})"
        )
    return body


#: a reference table's name: the spec lists the four; another gets 404 naming them
ReferenceName = Annotated[str, PathParam(json_schema_extra={"enum": list(TABLE_NAMES)})]


def _reference_name(name: str) -> None:
    if name not in TABLE_NAMES:
        raise HTTPException(
            404, f"no reference table {safe_text(name, 64)!r}; known: {', '.join(TABLE_NAMES)}"
        )


def safe_text(value: object, limit: int = 1_000) -> str:
    """Text any JSON encoder takes: lone surrogates escaped, at most ``limit`` characters."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _document(request: Request) -> Any:
    """A rules or offers document from a JSON or YAML body, parsed as files are
    (``engine.yamlfile``: YAML 1.2, no aliases) within the document limits: 413 over the
    size (before it is read), 422 over the depth or with aliases, 400 when it does not parse."""
    media = _media_type(request)
    if media not in JSON_TYPES and media not in YAML_TYPES and media != "":
        raise HTTPException(415, f"content type {media!r} is not supported: use JSON or YAML")
    body = await _body(request, MAX_DOCUMENT_BYTES, "max_document_bytes")
    too_deep = f"document nests deeper than {MAX_DOCUMENT_DEPTH} levels (max_document_depth)"
    try:
        if media not in JSON_TYPES:
            return load_yaml(body)
        document = json.loads(body)
    except DocumentLimitError as exc:
        raise HTTPException(413 if exc.too_large else 422, safe_text(exc)) from exc
    except RecursionError as exc:
        raise HTTPException(422, too_deep) from exc
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise HTTPException(400, f"body is not valid {media or 'YAML'}: {safe_text(exc)}") from exc
    if depth_over(document, MAX_DOCUMENT_DEPTH):
        raise HTTPException(422, too_deep)
    return document


DOC_BODY = {
    "required": True,
    "content": {
        media: {"schema": {"type": "object", "additionalProperties": True}}
        for media in ("application/json", "application/yaml")
    },
}
#: a reference table as JSON rows (CSV, Parquet and YAML bodies are taken too; see the route)
REFERENCE_BODY = {
    "required": True,
    "description": "The whole table: an array of rows (maps of column to value), or the same "
    "as YAML (application/yaml), CSV with a header (text/csv) or Parquet "
    "(application/vnd.apache.parquet).",
    "content": {
        "application/json": {
            "schema": {"type": "array", "items": {"type": "object", "additionalProperties": True}}
        }
    },
}
_SCALAR = {"type": ["string", "number", "integer", "boolean", "null"]}
#: an event as the body's structure sees it: a map of scalars and lists of scalars
_EVENT_MAP = {
    "type": "object",
    "additionalProperties": {"anyOf": [_SCALAR, {"type": "array", "items": _SCALAR}]},
}
#: the body is any event map, or an array of them: each event is checked on its own against
#: WireEvent, and one that fails is a dead letter in the 202 answer (valid events next to it are
#: taken). A body that is not a map or an array of maps is refused whole (400).
EVENTS_BODY = {
    "required": True,
    "description": "An event, or an array of at most "
    f"{MAX_EVENTS_PER_REQUEST:,} events; each is validated on its own against the WireEvent "
    "schema and reported by index in the answer.",
    "content": {
        media: {
            "schema": {
                "oneOf": [
                    _EVENT_MAP,
                    {"type": "array", "maxItems": MAX_EVENTS_PER_REQUEST, "items": _EVENT_MAP},
                ]
            }
        }
        for media in ("application/json", "application/msgpack")
    },
}

api = FastAPI(
    title="Kairos",
    version="1",
    description="Real-time customer engagement: events in, golden records, moments, next best "
    "actions out.",
)
api.add_middleware(AuthMiddleware)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's answer, except that a 405 lists in ``Allow`` every method the path has (one
    route per method: Starlette would name only the first route's)."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        path = request.url.path
        routes = [r for r in api.routes if isinstance(r, APIRoute) and r.path_regex.match(path)]
        methods = sorted({m for r in routes for m in (r.methods or ())})
        headers["Allow"] = ", ".join(methods)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


#: what a client is told to wait before trying again, in seconds
RETRY_AFTER_S = 2
#: after a 503 to an event request, the gateway marks no quiet spell in the log for this long:
#: the client's retry carries events made before it (an idle mark would make them late)
RETRIES_DUE_S = 2.0 * RETRY_AFTER_S
#: requests Serve's proxy queues per API deployment before it answers 503
MAX_QUEUED_REQUESTS = 512


def unavailable(reason: str) -> HTTPException:
    """A 503 with ``Retry-After``: the client may send the same request again later."""
    return HTTPException(503, reason, headers={"Retry-After": str(RETRY_AFTER_S)})


@api.exception_handler(ray.exceptions.RayError)
async def _engine_error(request: Request, exc: ray.exceptions.RayError) -> JSONResponse:
    """An actor of the engine died or is restarting: 503, try again (never a 500)."""
    log.warning("%s %s: the engine is recovering: %s", request.method, request.url.path,
                type(exc).__name__)  # fmt: skip
    return JSONResponse(
        {"detail": "the engine is recovering; try again shortly"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each problem's place and reason; the input itself is never echoed (it may
    be personal data, NaN or a lone surrogate, which JSON cannot carry)."""
    problems = [
        {
            "loc": [p if isinstance(p, int) else safe_text(p, 80) for p in e.get("loc", ())],
            "msg": safe_text(e.get("msg", ""), 300),
            "type": safe_text(e.get("type", ""), 80),
        }
        for e in exc.errors()[:MAX_ERRORS_LISTED]
    ]
    return JSONResponse({"detail": problems}, status_code=422)


def _add_event_schema(openapi: dict[str, Any]) -> dict[str, Any]:
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schema = WireEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas["WireEvent"] = schema
    return openapi


def _openapi() -> dict[str, Any]:
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        api.openapi_schema = _add_security(
            _add_event_schema(
                get_openapi(
                    title=api.title,
                    version=api.version,
                    description=api.description,
                    routes=api.routes,
                )
            )
        )
    return api.openapi_schema


def _add_security(openapi: dict[str, Any]) -> dict[str, Any]:
    """Bearer API keys on every operation but the health checks; 401 and 403 documented."""
    from deploy.security import OPEN_PATHS, required_scope

    openapi["components"]["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "kairos keys create"}
    }
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            if path in OPEN_PATHS:
                operation["security"] = []
                continue
            scope = required_scope(method.upper(), path)
            operation["security"] = [{"apiKey": []}]
            responses = operation.setdefault("responses", {})
            responses["401"] = {"description": "No API key, or not a valid one."}
            responses["403"] = {
                "description": f"The key lacks the scope {scope!r}." if scope else "Forbidden."
            }
    return openapi


api.openapi = _openapi  # type: ignore[method-assign]


# (helpers of the deployment class stand before it: Serve pickles it where it is defined)
def _principal(request: Request) -> Principal:
    """The caller, as AuthMiddleware found it (every route but the health checks has one)."""
    principal: Principal = request.state.principal
    return principal


def _refuse_restricted(request: Request, batch: Any) -> None:
    """403 for a whole batch holding consent or profile updates from a key without the
    ``ingest_restricted`` scope, naming the kinds and how many of each."""
    if _principal(request).may("ingest_restricted") or batch.num_rows == 0:
        return
    kinds = batch.column("kind").value_counts().to_pylist()
    found = {k["values"]: k["counts"] for k in kinds if k["values"] in RESTRICTED_KINDS}
    if found:
        named = ", ".join(f"{kind} ({n} events)" for kind, n in sorted(found.items()))
        raise HTTPException(
            403, f"this key may not send {named}: they need the scope 'ingest_restricted'; "
            "nothing of the batch was taken",
        )  # fmt: skip


@serve.deployment(
    name=API_DEPLOYMENT,
    num_replicas=1,
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
    max_queued_requests=512,
)
@serve.ingress(api)
class KairosApi:
    """The HTTP face of one running engine (the gateway actor and its shards)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = ServiceConfig.model_validate(config or {})
        cfg = self.config
        cfg.check_secrets(cfg.settings())  # serve run with the development key: refused
        confine_serve_grpc()  # this replica's internal gRPC server on loopback, as the node
        # detached and restarted by Ray when it dies: a new gateway restores the engine from
        # the last checkpoint and reads the log from there
        self.gateway = GatewayActor.options(
            name=cfg.gateway_name,
            namespace=cfg.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0.25,
            max_restarts=-1,
            max_task_retries=0,
        ).remote(cfg.gateway(), cfg.ranker_starter(), cfg.retrainer_maker())
        routing = ray.get(self.gateway.routing.remote())
        #: who owns a customer: only the ingestor's pseudonymizer and shard map are used here
        self.ingestor = Ingestor(routing["settings"])
        #: API keys and the audit trail, used by deploy.security.AuthMiddleware
        limits = KeyRateLimits(self.gateway, cfg.rate_limit_per_s, routing["limiter"])
        # the ledger's process started, so the first request does not wait out its start (a
        # request waits for a lease at most LEASE_WAIT_S, then gets 503)
        ray.get(routing["limiter"].__ray_ready__.remote(), timeout=120)
        self.guard = Guard.open(
            cfg.keys_path, cfg.audit_path, routing["settings"].pseudonym_key, limits
        )
        install(self.guard)
        self._route(routing)
        self._log: IngestLog | None = None
        self._log_lock: asyncio.Lock | None = None
        #: the engine's lag behind the log, as last asked, and when it was asked / answered
        self._lag = 0
        self._checkpoint_error: str | None = None
        #: POST /v1/events requests this replica is working on (bounded: max_events_in_flight)
        self._events_in_flight = 0
        self._replica = secrets.token_hex(8)
        self._busy_seq = 0
        self._busy_told = 0.0
        #: until when (time.monotonic()) retries of event requests refused with 503 are due
        self._retries_due = 0.0
        self._lag_asked = 0.0
        self._lag_answered = time.monotonic()

    def _route(self, routing: dict[str, Any]) -> None:
        self.shards = list(routing["shards"])
        self.decision_sink = routing["decision_sink"]
        self.generation = routing["generation"]

    async def _reroute(self) -> None:
        """A shard call failed: the gateway may have replaced it; read the routing again."""
        self._route(await self.gateway.routing.remote())

    async def _on_shard(self, owner: int, call: Any) -> Any:
        """``call(shard)`` on the owning shard; once more after a routing refresh if the actor
        is gone (a replaced shard); a RayError after that becomes a 503."""
        try:
            return await call(self.shards[owner])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            await self._reroute()
            return await call(self.shards[owner])

    async def _ingest_log(self) -> IngestLog:
        config = self.config.log()
        assert config is not None
        if self._log_lock is None:
            self._log_lock = asyncio.Lock()
        async with self._log_lock:
            if self._log is None:
                try:
                    self._log = await IngestLog.open(config)
                except LOG_ERRORS as exc:
                    raise unavailable(f"the ingest log cannot be reached: {exc}") from exc
            return self._log

    async def _shed_load(self) -> None:
        """503 while the engine is too far behind the log, cannot write its checkpoints, or has
        not answered for long."""
        now = time.monotonic()
        if now - self._lag_asked > 0.25:
            self._lag_asked = now
            try:
                backlog = await asyncio.wait_for(self.gateway.backlog.remote(), timeout=2.0)
                self._lag, self._checkpoint_error = backlog["lag"], backlog["checkpoint_error"]
                self._lag_answered = now
            except (ray.exceptions.RayError, TimeoutError):
                pass  # restarting: the log still takes events, within the limits below
        if now - self._lag_answered > 30.0:
            raise unavailable("the engine has not answered for 30 s; it is recovering")
        if self._lag > self.config.max_lag_messages:
            raise unavailable(f"the engine is {self._lag} batches behind the ingest log: slow down")
        if self._checkpoint_error is not None:
            raise unavailable(
                "the engine cannot write its checkpoints (storage failing); nothing is "
                f"acknowledged until it can: {safe_text(self._checkpoint_error, 300)}"
            )

    async def __del__(self) -> None:
        """Serve stops this replica (``serve run`` Ctrl-C, shutdown, redeploy): have the
        gateway write its logs first. Events still waiting for the watermark are not applied
        here (the ranker may be stopping too); ``kairos serve`` applies them on Ctrl-C."""
        try:
            await asyncio.wait_for(self.gateway.save.remote(), timeout=10)
        except Exception:  # the gateway may already be gone; nothing more to save then
            log.warning("could not save the gateway's logs while stopping", exc_info=True)

    # -- events --------------------------------------------------------------------------------
    @api.post(
        "/v1/events",
        status_code=202,
        response_model=IngestReport,
        responses={
            400: {"description": "The body cannot be read (not msgpack / JSON, not events)."},
            413: {"description": "The body is over the size limit."},
            415: {"description": "Another content type than msgpack or JSON."},
            422: {"description": f"More than {MAX_EVENTS_PER_REQUEST:,} events."},
            503: {
                "description": "Not acknowledged (overload, the log or checkpoints failing, "
                "recovery): send it again with the same Idempotency-Key after Retry-After."
            },
        },
        openapi_extra={"requestBody": EVENTS_BODY},
        summary="Ingest a batch of events",
    )
    async def events(self, request: Request) -> JSONResponse:
        """A batch (an array) or one event (a map), as ``application/msgpack`` or JSON.

        Valid events are applied even when others in the batch are rejected; each rejected
        event is reported with its index, the field and value that are wrong, and why.
        """
        media = _media_type(request)
        if media not in MSGPACK_TYPES and media not in JSON_TYPES:
            raise HTTPException(
                415, f"content type {media!r} is not supported: use application/msgpack or JSON"
            )
        if self._events_in_flight >= self.config.max_events_in_flight:  # shed before reading
            self._retries_due = time.monotonic() + RETRIES_DUE_S
            raise unavailable(
                f"this replica is working on {self._events_in_flight} event requests: slow down"
            )
        self._events_in_flight += 1
        if self._events_in_flight == 1 or time.monotonic() - self._busy_told > API_BUSY_RETOLD_S:
            self._tell_busy(API_BUSY_EXPIRES_S)
        try:
            return await self._events(request, media)
        except (HTTPException, ray.exceptions.RayError) as exc:  # a RayError answers 503
            if getattr(exc, "status_code", 503) == 503:
                self._retries_due = time.monotonic() + RETRIES_DUE_S
            raise
        finally:
            self._events_in_flight -= 1
            if self._events_in_flight == 0:
                self._tell_busy(max(self._retries_due - time.monotonic(), 0.0))

    def _tell_busy(self, hold_s: float) -> None:
        """Tell the gateway this replica's events may still come for ``hold_s`` seconds (it
        starts on event requests, or refused some whose retries are due) or, with 0, that none
        are under way: it marks a quiet spell in the log only when no replica's events may
        still come (``GatewayActor.api_busy``). Not awaited."""
        self._busy_seq += 1
        self._busy_told = time.monotonic()
        self.gateway.api_busy.remote(self._replica, self._busy_seq, hold_s)

    async def _events(self, request: Request, media: str) -> JSONResponse:
        body = await _body(request, self.config.max_body_bytes)
        try:
            rows = decode_msgpack(body) if media in MSGPACK_TYPES else decode_json(body)
        except PayloadTooLargeError as exc:  # too many events: the body may be small
            raise HTTPException(422, str(exc)) from exc
        except EventError as exc:
            raise HTTPException(400, safe_text(exc)) from exc
        batch, positions, letters = rows_to_batch(rows)
        _refuse_restricted(request, batch)
        if self.config.nats_url is None:  # no log: straight into the engine
            report = await self.gateway.submit.remote(batch, positions, letters)
            return JSONResponse(report, status_code=202)
        return await self._publish(request, body, batch, positions, letters)

    async def _publish(
        self, request: Request, body: bytes, batch: Any, positions: Any, letters: list[Any]
    ) -> JSONResponse:
        """Validate the request's events and publish the valid ones (and the dead letters of
        the rest) to the ingest log as one message; 202 once JetStream acknowledged it."""
        batch_id = request.headers.get("idempotency-key") or hashlib.sha256(body).hexdigest()
        if len(batch_id) > MAX_ID_CHARS:
            raise HTTPException(400, f"Idempotency-Key is over {MAX_ID_CHARS} characters")
        checked = validate(conform(batch), positions)
        valid = checked.valid()
        refused = sorted([*letters, *checked.dead_letters], key=lambda d: d.index)
        # the log holds customer keys, not identifiers (pseudonymized here, in parallel)
        events = keyed(valid, self.ingestor.pseudonymizer)
        payload = encode_message(events, checked.positions[checked.keep], refused)
        ingest_log = await self._ingest_log()
        if len(payload) > ingest_log.config.max_message_bytes:
            raise HTTPException(
                413, f"the batch is {len(payload):,} bytes encoded, over the log's limit of "
                f"{ingest_log.config.max_message_bytes:,}: send fewer events per request",
            )  # fmt: skip
        await self._shed_load()
        try:
            sequence, duplicate = await ingest_log.publish(payload, batch_id)
        except LOG_ERRORS as exc:
            log.warning("the ingest log did not take a batch: %s", type(exc).__name__)
            raise unavailable(
                f"the ingest log did not acknowledge the batch ({type(exc).__name__}); send it "
                "again with the same Idempotency-Key: it is stored once"
            ) from exc
        if not duplicate:
            m = metrics()
            m.count(m.ingested, accepted_by_kind(batch, positions, refused), "kind")
            m.count(m.rejected, rejected_by_kind(refused), "kind")
        report = {
            "accepted": valid.num_rows,
            "rejected": len(refused),
            "errors": [letter_json(d) for d in refused[:MAX_ERRORS_LISTED]],
            "errors_truncated": len(refused) > MAX_ERRORS_LISTED,
            "batch_id": batch_id,
            "sequence": sequence,
            "duplicate": duplicate,
        }
        return JSONResponse(report, status_code=202)

    # -- decisions ------------------------------------------------------------------------------
    @api.post(
        "/v1/decide",
        response_model=DecideResponse,
        responses={
            400: {"description": "The body is not JSON."},
            503: {
                "description": "Decisions are off (no offer catalog), or the decision could "
                "not be written to the ingest log: ask again after Retry-After."
            },
        },
        summary="The next best action for a customer on a channel, now",
    )
    async def decide(self, body: DecideRequest, request: Request) -> DecideResponse:
        """Inbound decisioning (web, app, call center) under the outbound contact policy
        (quiet hours aside). With an ingest log, the decision is written to it before the
        answer (a crash keeps its contact); the gateway reads it back into the decision log."""
        if self.decision_sink is None:
            raise HTTPException(503, "decisions are off: the service runs without offers")
        rid = body.request_id
        request_id = event_id_from_text(rid) if rid else secrets.randbits(63)
        row = await self._decide_batch(
            (body.customer_id, body.channel, body.context.ts_ms(), request_id, body.context.page)
        )
        self.guard.record(
            _principal(request), "decide", subject=self.guard.subject(row["customer_key"]),
            decision=f"{row['decision_id']:016x}", offer=row["action"],
        )  # fmt: skip
        return DecideResponse(
            decision_id=f"{row['decision_id']:016x}",
            customer_id=body.customer_id,
            action=row["action"],
            channel=row["channel"],
            reason=row["reason"],
            delivered=row["delivered"],
            control=row["control"],
            explored=row["explored"],
            probability=row["probability"],
            propensity=row["propensity"],
            model_version=row["model_version"],
            candidates=[Candidate(**c) for c in row["candidates"]],
        )

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _decide_batch(self, asks: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """Concurrent decide requests, one shard call per owning shard (adaptive batching:
        while a batch is out, the next one gathers)."""
        by_shard: dict[int, list[int]] = {}
        keys = []
        for i, (customer_id, *_) in enumerate(asks):
            key, owner = self.ingestor.owner_of(customer_id)
            keys.append(key)
            by_shard.setdefault(owner, []).append(i)

        logged = self.config.nats_url is not None

        def ask(idx: list[int]) -> Any:
            return lambda shard: shard.decide_inbound.remote(
                np.array([keys[i] for i in idx], dtype=np.uint64),
                [asks[i][1] for i in idx],
                np.array([asks[i][2] for i in idx], dtype=np.int64),
                np.array([asks[i][3] for i in idx], dtype=np.uint64),
                [asks[i][4] for i in idx],
                logged,
            )

        tables = await asyncio.gather(
            *(self._on_shard(owner, ask(idx)) for owner, idx in by_shard.items())
        )
        if logged:  # written ahead: the answers below are in the log, as durable as events
            await asyncio.gather(*(self._publish_decisions(table) for table in tables))
        out: list[dict[str, Any]] = [{} for _ in asks]
        for (_, idx), table in zip(by_shard.items(), tables, strict=True):
            if not logged and self.decision_sink is not None:
                self.decision_sink.write.remote(table)
            for i, row in zip(idx, table.to_pylist(), strict=True):
                out[i] = row
        return out

    async def _publish_decisions(self, table: Any) -> None:
        """Inbound decisions into the ingest log before they are answered: the gateway reads
        them back in order, records them in the decision log, and a restore that went back
        behind them records their contacts again (``ShardLogic.record_inbound``)."""
        ids = table.column("decision_id").to_numpy()
        msg_id = "decide:" + hashlib.sha256(np.asarray(ids, dtype="<u8").tobytes()).hexdigest()
        ingest_log = await self._ingest_log()
        try:
            await ingest_log.publish(encode_decisions(table), msg_id)
        except LOG_ERRORS as exc:
            log.warning("the ingest log did not take decisions: %s", type(exc).__name__)
            raise unavailable(
                f"the decision could not be recorded ({type(exc).__name__}): ask again"
            ) from exc

    # -- golden records ---------------------------------------------------------------------------
    @api.post(
        "/v1/customers/lookup",
        responses={
            400: {"description": "The body is not JSON."},
            404: {"description": "No event of this customer has been seen."},
        },
        summary="A customer's golden record",
    )
    async def customer(self, body: LookupRequest, request: Request) -> JSONResponse:
        """Profile, running aggregates, rule and contact state, and the newest triggers and
        decisions, read from the shard that owns the customer. The identifier travels in the
        body, never in the URL (which proxies and access logs keep); every read is audited."""
        customer_id = body.customer_id
        key, owner = self.ingestor.owner_of(customer_id)
        record = await self._on_shard(owner, lambda shard: shard.customer.remote(key))
        self.guard.record(_principal(request), "profile.read",
                          subject=self.guard.subject(key, exists=record is not None),
                          found=record is not None)  # fmt: skip
        if record is None:
            raise HTTPException(404, "no event of this customer has been seen")
        profile = {k: record.pop(k) for k in PROFILE_COLUMNS if k in record}
        out = {
            "customer_id": customer_id,
            "customer_key": f"{record.pop('customer_key'):016x}",
            "shard": owner,
            "profile": profile,
            "recent_triggers": record.pop("recent_triggers"),
            "recent_decisions": record.pop("recent_decisions"),
            "rule_state": record.pop("rules"),
            "contact_state": record.pop("contacts"),
            "aggregates": record,
        }
        return JSONResponse(jsonable_encoder(out))

    # -- run-time configuration -----------------------------------------------------------------
    @api.get("/v1/rules", summary="The running rules")
    async def get_rules(self) -> JSONResponse:
        return JSONResponse(jsonable_encoder(await self.gateway.rules.remote()))

    @api.put(
        "/v1/rules",
        responses=_document_responses("the running rules stay"),
        openapi_extra={"requestBody": DOC_BODY},
        summary="Replace the rules while the engine runs",
    )
    async def put_rules(self, request: Request) -> JSONResponse:
        """A rule document (JSON or YAML, as in rules.yaml); swapped between micro-batches
        without losing state. Rejected whole, with every problem, if anything is wrong."""
        document = await _document(request)
        result = await self.gateway.set_rules.remote(document)
        self._audit_change(request, "rules.change", document, result)
        return self._outcome(result, "rules")

    @api.get("/v1/offers", summary="The running offer catalog")
    async def get_offers(self) -> JSONResponse:
        document = await self.gateway.offers.remote()
        if document is None:
            raise HTTPException(404, "decisions are off: the service runs without offers")
        return JSONResponse(jsonable_encoder(document))

    @api.put(
        "/v1/offers",
        responses=_document_responses("the running catalog stays"),
        openapi_extra={"requestBody": DOC_BODY},
        summary="Replace the offer catalog while the engine runs",
    )
    async def put_offers(self, request: Request) -> JSONResponse:
        document = await _document(request)
        result = await self.gateway.set_offers.remote(document)
        self._audit_change(request, "offers.change", document, result)
        return self._outcome(result, "offers")

    @api.get("/v1/reference", summary="The reference tables: their version and rows")
    async def get_reference(self) -> JSONResponse:
        return JSONResponse(await self.gateway.reference.remote())

    @api.get(
        "/v1/reference/{name}",
        responses={404: {"description": "No reference table of that name."}},
        summary="The rows of one reference table",
    )
    async def get_reference_table(self, name: ReferenceName) -> JSONResponse:
        _reference_name(name)
        rows = await self.gateway.reference_table.remote(name)
        return JSONResponse(jsonable_encoder({"name": name, "rows": rows}))

    @api.put(
        "/v1/reference/{name}",
        responses={
            400: {"description": "The body does not parse in its content type."},
            404: {"description": "No reference table of that name."},
            413: {"description": f"The body is over {MAX_REFERENCE_BYTES:,} bytes."},
            415: {"description": "Another content type than JSON, YAML, CSV or Parquet."},
            422: {"model": Problems, "description": "Invalid: the running table stays."},
        },
        openapi_extra={"requestBody": REFERENCE_BODY},
        summary="Replace one reference table (stores, stock, recalls, accessories)",
    )
    async def put_reference(self, name: ReferenceName, request: Request) -> JSONResponse:
        """The whole table: rows as JSON or YAML (a list of maps), CSV with a header, or
        Parquet. Validated whole, with the other tables (stock of an unknown store is refused),
        then broadcast to every shard between micro-batches; on any problem nothing changes and
        the answer lists every problem (table, column, row)."""
        _reference_name(name)
        media = _media_type(request)
        fmt = REFERENCE_FORMATS.get(media)
        if fmt is None:
            raise HTTPException(
                415,
                f"content type {media!r} is not supported: use JSON, YAML, CSV "
                "(text/csv) or Parquet (application/vnd.apache.parquet)",
            )
        body = await _body(request, MAX_REFERENCE_BYTES, "max_reference_bytes")
        try:
            table = validate_table(name, read_table(name, body, fmt))
        except UnreadableTableError as exc:
            raise HTTPException(400, safe_text(exc)) from exc
        except ReferenceDataError as exc:
            result: dict[str, Any] = {"ok": False, "errors": exc.problems}
        else:
            result = await self.gateway.set_reference.remote(name, table)
        self.guard.record(_principal(request), "reference.change", table=name,
                          applied=bool(result["ok"]), version=result.get("version"),
                          sha256=hashlib.sha256(body).hexdigest())  # fmt: skip
        return self._outcome(result, f"reference table '{name}'")

    def _audit_change(
        self, request: Request, action: str, document: Any, result: dict[str, Any]
    ) -> None:
        """Who changed the running configuration, to what (a digest of the document)."""
        text = json.dumps(jsonable_encoder(document), sort_keys=True, separators=(",", ":"))
        self.guard.record(_principal(request), action, applied=bool(result["ok"]),
                          sha256=hashlib.sha256(text.encode()).hexdigest())  # fmt: skip

    @staticmethod
    def _outcome(result: dict[str, Any], what: str) -> JSONResponse:
        if not result["ok"]:
            detail = f"invalid {what}: nothing was changed"
            return JSONResponse({"detail": detail, "errors": result["errors"]}, status_code=422)
        return JSONResponse(result)

    # -- operations -----------------------------------------------------------------------------
    @api.get("/v1/stats", summary="Ingest and engine counters")
    async def stats(self) -> JSONResponse:
        """``ingested`` events were accepted; ``applied`` ones reached the golden records;
        ``pending`` ones wait for the watermark (released when the stream goes quiet)."""
        return JSONResponse(jsonable_encoder(await self.gateway.stats.remote()))

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        responses={503: {"description": "The engine or the ranker is not ready."}},
        summary="Readiness: shards answer, and the ranker runs when decisions are on",
    )
    async def readyz(self) -> JSONResponse:
        try:
            engine = await self.gateway.ready.remote()
        except ray.exceptions.RayError as exc:
            return JSONResponse({"status": "not ready", "reason": str(exc)}, status_code=503)
        if self.decision_sink is not None:
            status = serve.status().applications.get(RANKER_APP)
            if status is None or str(status.status) not in ("RUNNING", "ApplicationStatus.RUNNING"):
                state = status.status if status else "absent"
                reason = f"ranker application {RANKER_APP!r} is {state}"
                return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready", **engine})


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve application builder (``deploy.api:build_app``); ``args`` is a ServiceConfig."""
    config = ServiceConfig.model_validate(args or {})
    return KairosApi.bind(config.model_dump())


def api_app_config(
    config: ServiceConfig, replicas: int = 1, num_cpus: float = 0.25, route_prefix: str = "/"
) -> dict[str, Any]:
    """The API's entry of a Serve config file (``applications:``)."""
    return {
        "name": API_APP,
        "route_prefix": route_prefix,
        "import_path": "deploy.api:build_app",
        "args": config.model_dump(),
        # a log line per request costs more CPU than a decision: errors are still logged
        "logging_config": {"enable_access_log": False},
        "deployments": [
            {
                "name": API_DEPLOYMENT,
                "num_replicas": replicas,
                "ray_actor_options": {"num_cpus": num_cpus},
                # beyond this many requests waiting for a replica, Serve answers 503 at once
                # rather than queueing without bound
                "max_queued_requests": MAX_QUEUED_REQUESTS,
            }
        ],
    }
