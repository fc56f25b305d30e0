"""Kairos's HTTP API: a Ray Serve deployment with a FastAPI ingress, under ``/v1``.

``POST /v1/events``       a batch of events (msgpack or JSON) -> 202 with accepted/rejected
``POST /v1/decide``       inbound next best action for a customer on a channel, now
``GET  /v1/customers/ID`` the golden record, from the owning shard
``GET|PUT /v1/rules``     the running rules; a PUT swaps them (an invalid one changes nothing)
``GET|PUT /v1/offers``    the running offer catalog, likewise
``GET  /v1/stats``        ingest and engine counters
``GET  /healthz``, ``GET /readyz``; OpenAPI at ``/openapi.json``, docs at ``/docs``.

API replicas decode and coerce bodies in parallel and pass Arrow batches to the gateway actor
(``actors.gateway``), which micro-batches across requests. Decisions and golden-record reads go
straight to the owning shard actor.
"""

import asyncio
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
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from ray import serve

from actors.gateway import GatewayActor
from deploy.service import ServiceConfig
from engine.decision.catalog import NO_ACTION
from engine.decision.scorer import RANKER_APP
from engine.errors import EventError
from engine.events.codec import decode_json, decode_msgpack, event_id_from_text, rows_to_batch
from engine.events.schema import CHANNELS, KIND_NAMES, PAYLOAD_FIELDS
from engine.ingest import Ingestor
from engine.state.store import PROFILE_COLUMNS

log = logging.getLogger("ray.serve")
API_APP = "kairos"
API_DEPLOYMENT = "api"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/plain")

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
    rejected: int
    errors: list[EventErrorItem]


class DecideContext(BaseModel):
    model_config = ConfigDict(extra="forbid")

    page: str | None = Field(None, max_length=2048, description="The page or screen the "
                             "customer is on; offer eligibility can use it as `page`.")  # fmt: skip
    ts: datetime | None = Field(None, description="Time of the request (default: now).")


class DecideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: Annotated[str, Field(min_length=1, max_length=256)]
    channel: Literal[CHANNELS]  # type: ignore[valid-type]
    context: DecideContext = Field(default_factory=DecideContext)
    request_id: Annotated[str | None, Field(max_length=256)] = Field(
        None, description="Idempotency: a retried request with the same id gets the same draws."
    )


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
                        "control_group")  # fmt: skip
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
    errors: list[str]


# -- helpers ---------------------------------------------------------------------------------
def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit} bytes")
    body = await request.body()
    if len(body) > limit:
        raise HTTPException(413, f"body of {len(body)} bytes is over the limit of {limit} bytes")
    return body


def _document(body: bytes, media: str) -> Any:
    """A rules or offers document from a JSON or YAML body."""
    try:
        if media in JSON_TYPES:
            return json.loads(body)
        if media in YAML_TYPES or media == "":
            return yaml.safe_load(body)
    except (json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise HTTPException(400, f"body is not valid {media or 'YAML'}: {exc}") from exc
    raise HTTPException(415, f"content type {media!r} is not supported: use JSON or YAML")


def _ms(value: datetime | None) -> int:
    if value is None:
        return int(time.time() * 1000)
    if value.tzinfo is None:
        raise HTTPException(422, "context.ts has no time zone (add Z or an offset)")
    return round(value.timestamp() * 1000)


DOC_BODY = {
    "required": True,
    "content": {
        media: {"schema": {"type": "object", "additionalProperties": True}}
        for media in ("application/json", "application/yaml")
    },
}
EVENTS_BODY = {
    "required": True,
    "content": {
        media: {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/WireEvent"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/WireEvent"}},
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


def _add_event_schema(openapi: dict[str, Any]) -> dict[str, Any]:
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schema = WireEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas["WireEvent"] = schema
    return openapi


def _openapi() -> dict[str, Any]:
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        api.openapi_schema = _add_event_schema(
            get_openapi(
                title=api.title,
                version=api.version,
                description=api.description,
                routes=api.routes,
            )
        )
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


@serve.deployment(
    name=API_DEPLOYMENT,
    num_replicas=1,
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=256,
)
@serve.ingress(api)
class KairosApi:
    """The HTTP face of one running engine (the gateway actor and its shards)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = ServiceConfig.model_validate(config or {})
        cfg = self.config
        self.gateway = GatewayActor.options(
            name=cfg.gateway_name,
            namespace=cfg.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0.25,
        ).remote(cfg.gateway(), cfg.ranker_starter(), cfg.retrainer_maker())
        routing = ray.get(self.gateway.routing.remote())
        #: who owns a customer: only the ingestor's pseudonymizer and shard map are used here
        self.ingestor = Ingestor(routing["settings"])
        ns = routing["namespace"]
        self.shards = [ray.get_actor(name, namespace=ns) for name in routing["shards"]]
        sink = routing["decision_sink"]
        self.decision_sink = ray.get_actor(sink, namespace=ns) if sink else None

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
        body = await _body(request, self.config.max_body_bytes)
        try:
            rows = decode_msgpack(body) if media in MSGPACK_TYPES else decode_json(body)
        except EventError as exc:
            raise HTTPException(400, str(exc)) from exc
        batch, positions, letters = rows_to_batch(rows)
        report = await self.gateway.submit.remote(batch, positions, letters)
        return JSONResponse(report, status_code=202)

    # -- decisions ------------------------------------------------------------------------------
    @api.post(
        "/v1/decide",
        response_model=DecideResponse,
        responses={503: {"description": "Decisions are off (no offer catalog)."}},
        summary="The next best action for a customer on a channel, now",
    )
    async def decide(self, body: DecideRequest) -> DecideResponse:
        """Inbound decisioning (web, app, call center) under the outbound contact policy
        (quiet hours aside); the decision is written to the decision log."""
        if self.decision_sink is None:
            raise HTTPException(503, "decisions are off: the service runs without offers")
        rid = body.request_id
        request_id = event_id_from_text(rid) if rid else secrets.randbits(63)
        row = await self._decide_batch(
            (body.customer_id, body.channel, _ms(body.context.ts), request_id, body.context.page)
        )
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
        refs = {
            owner: self.shards[owner].decide_inbound.remote(
                np.array([keys[i] for i in idx], dtype=np.uint64),
                [asks[i][1] for i in idx],
                np.array([asks[i][2] for i in idx], dtype=np.int64),
                np.array([asks[i][3] for i in idx], dtype=np.uint64),
                [asks[i][4] for i in idx],
            )
            for owner, idx in by_shard.items()
        }
        out: list[dict[str, Any]] = [{} for _ in asks]
        for owner, idx in by_shard.items():
            table = await refs[owner]
            if self.decision_sink is not None:
                self.decision_sink.write.remote(table)
            for i, row in zip(idx, table.to_pylist(), strict=True):
                out[i] = row
        return out

    # -- golden records ---------------------------------------------------------------------------
    @api.get(
        "/v1/customers/{customer_id}",
        responses={404: {"description": "No event of this customer has been seen."}},
        summary="A customer's golden record",
    )
    async def customer(self, customer_id: str) -> JSONResponse:
        """Profile, running aggregates, rule and contact state, and the newest triggers and
        decisions, read from the shard that owns the customer."""
        key, owner = self.ingestor.owner_of(customer_id)
        record = await self.shards[owner].customer.remote(key)
        if record is None:
            raise HTTPException(404, f"customer {customer_id!r} is unknown")
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
        responses={422: {"model": Problems, "description": "Invalid: the running rules stay."}},
        openapi_extra={"requestBody": DOC_BODY},
        summary="Replace the rules while the engine runs",
    )
    async def put_rules(self, request: Request) -> JSONResponse:
        """A rule document (JSON or YAML, as in rules.yaml); swapped between micro-batches
        without losing state. Rejected whole, with every problem, if anything is wrong."""
        document = _document(await _body(request, self.config.max_body_bytes), _media_type(request))
        return self._outcome(await self.gateway.set_rules.remote(document), "rules")

    @api.get("/v1/offers", summary="The running offer catalog")
    async def get_offers(self) -> JSONResponse:
        document = await self.gateway.offers.remote()
        if document is None:
            raise HTTPException(404, "decisions are off: the service runs without offers")
        return JSONResponse(jsonable_encoder(document))

    @api.put(
        "/v1/offers",
        responses={422: {"model": Problems, "description": "Invalid: the running catalog stays."}},
        openapi_extra={"requestBody": DOC_BODY},
        summary="Replace the offer catalog while the engine runs",
    )
    async def put_offers(self, request: Request) -> JSONResponse:
        document = _document(await _body(request, self.config.max_body_bytes), _media_type(request))
        return self._outcome(await self.gateway.set_offers.remote(document), "offers")

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
            }
        ],
    }
