"""handlers.py: the controller's HTTP API, /apis/nodemesh.io/v1alpha1/...

Routes a Request to list, get, apply, delete or watch; checks the caller first (auth.py),
validates with controller.api, and leaves durability to the store and fan-out to the hub.
Every answer is JSON; errors are Kubernetes-style Status objects with a code and a message
that says what to fix. Knows nothing of sockets or TLS (httpd.py has those).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Callable

import trio

from controller import api, auth
from controller.httpd import HttpError, Request, Response, StreamResponse
from controller.metrics import ControllerMetrics
from controller.store import CompactedError, ConflictError, NotFoundError, Store
from controller.watch import Hub, watch

log = logging.getLogger("nodemesh.controller")

PREFIX = "/apis/nodemesh.io/v1alpha1"
BOOKMARK_EVERY = 15.0
ACTIONS = {"ADDED": "created", "MODIFIED": "configured", "UNCHANGED": "unchanged", "DELETED": "deleted"}


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Api:
    store: Store
    hub: Hub
    metrics: ControllerMetrics
    trust_domain: str
    now: Callable[[], str] = utcnow
    bookmark_every: float = BOOKMARK_EVERY
    # Extra fixed routes (identity_api.py): (method, path under PREFIX) -> (metric verb, auth verb
    # or None when anonymous callers are allowed, handler(req, caller)).
    routes: dict = field(default_factory=dict)

    async def __call__(self, req: Request) -> Response | StreamResponse:
        verb = "other"
        try:
            if req.path == "/healthz":
                verb = "health"
                return Response.json(200, {"status": "ok", "resourceVersion": str(self.store.revision),
                                           "trustDomain": self.trust_domain})
            caller = auth.caller_from_cert(req.peer_cert, self.trust_domain)
            fixed = req.path.startswith(PREFIX + "/") and self.routes.get((req.method, req.path[len(PREFIX) + 1:]))
            if fixed:
                verb, needed, handler = fixed
                if needed is not None:
                    auth.authorize(caller, needed)
                response = await handler(req, caller)
            else:
                if caller == auth.ANONYMOUS:   # authenticate before routing: no 404/405 to strangers
                    auth.authorize(caller, auth.Verb.READ)
                verb, handler, args = self._route(req)
                auth.authorize(caller, auth.Verb.READ if verb in ("list", "get", "watch", "discovery") else auth.Verb.WRITE)
                response = await handler(req, caller, *args)
        except auth.AuthError as e:
            log.warning("refused %s %s from %s: %s", req.method, req.path, req.peer_addr, e)
            response = HttpError(e.code, "Unauthorized" if e.code == 401 else "Forbidden", str(e)).response()
        except HttpError as e:
            response = e.response()
        self.metrics.requests.labels(verb, str(response.status)).inc()
        return response

    # --- routing -------------------------------------------------------------------------

    def _route(self, req: Request):
        if not (req.path == PREFIX or req.path.startswith(PREFIX + "/")):
            raise HttpError(404, "NotFound", f"no such path {req.path}; the API lives under {PREFIX}/")
        parts = [p for p in req.path[len(PREFIX):].split("/") if p]
        m = req.method
        if not parts:
            return _only(m, "GET", "discovery", self._discovery, ())
        if parts == ["apply"]:
            return _only(m, "POST", "apply", self._apply, ())
        if parts == ["delete"]:
            return _only(m, "POST", "delete", self._delete_batch, ())
        if parts == ["watch"]:
            return _only(m, "GET", "watch", self._watch, (None, None))
        namespace = None
        if parts[0] == "namespaces" and len(parts) >= 3:
            namespace, parts = parts[1], parts[2:]
        if len(parts) > 2:
            raise HttpError(404, "NotFound", f"no such path {req.path}")
        info = _kind(parts[0])
        if namespace is not None and not info.namespaced:
            raise HttpError(404, "NotFound", f"{info.kind} is cluster-scoped: use {PREFIX}/{info.plural}")
        if len(parts) == 1:
            if req.arg("watch") in ("1", "true"):
                return _only(m, "GET", "watch", self._watch, (info, namespace))
            return _only(m, "GET", "list", self._list, (info, namespace))
        key = (info.kind, (namespace or "") if info.namespaced else "", parts[1])
        if info.namespaced and namespace is None:
            raise HttpError(404, "NotFound", f"{info.kind} is namespaced: use {PREFIX}/namespaces/NS/{info.plural}/{parts[1]}")
        if m == "DELETE":
            return "delete", self._delete_one, (key,)
        return _only(m, "GET", "get", self._get, (key,))

    # --- reads ---------------------------------------------------------------------------

    async def _discovery(self, req, caller):
        return Response.json(200, {"apiVersion": api.API_VERSION, "resources": [
            {"kind": i.kind, "name": i.plural, "singularName": i.singular,
             "shortNames": list(i.short_names), "namespaced": i.namespaced}
            for i in api.KINDS.values()]})

    async def _list(self, req, caller, info, namespace):
        items, rev = await trio.to_thread.run_sync(self.store.list, info.kind, namespace)
        return Response.json(200, {"apiVersion": "v1", "kind": "List",
                                   "metadata": {"resourceVersion": str(rev)}, "items": items})

    async def _get(self, req, caller, key):
        obj = await trio.to_thread.run_sync(self.store.get, *key)
        if obj is None:
            raise HttpError(404, "NotFound", f"{_ref(key)} not found", {"kind": key[0], "name": key[2]})
        return Response.json(200, obj)

    # --- writes --------------------------------------------------------------------------

    async def _apply(self, req, caller):
        body = req.json()
        docs = body.get("items") if isinstance(body, dict) else None
        if not isinstance(docs, list) or not docs:
            raise HttpError(400, "BadRequest", 'body must be {"items": [resource, ...]} with at least one resource')
        source = "request"  # the CLI already named files; here a document is an item's index
        objects, problems = [], []
        for index, doc in enumerate(docs, start=1):
            try:
                resource = api.from_dict(doc, source=source, index=index)
            except api.ManifestError as e:
                problems += e.problems
                continue
            problems += self._check_mesh(resource, source, index)
            obj = api.to_dict(resource)
            rv = (doc.get("metadata") or {}).get("resourceVersion") if isinstance(doc, dict) else None
            if rv:
                obj["metadata"]["resourceVersion"] = str(rv)
            objects.append(obj)
        if problems:
            raise HttpError(422, "Invalid", "\n".join(str(p) for p in problems),
                            {"problems": [str(p) for p in problems]})
        if body.get("dryRun"):
            return Response.json(200, {"resourceVersion": str(self.store.revision), "dryRun": True,
                                       "results": [_result(o, "validated") for o in objects]})
        now = self.now()
        try:
            result = await trio.to_thread.run_sync(lambda: self.store.apply(objects, now=now))
        except ConflictError as e:
            raise HttpError(409, "Conflict", str(e)) from None
        self.hub.publish(result.revision)
        log.info("apply by %s: revision %d, %s", caller, result.revision,
                 ", ".join(f"{_ref(c.key)} {ACTIONS[c.type]}" for c in result.changes))
        return Response.json(200, {"resourceVersion": str(result.revision),
                                   "results": [_result(c.object, ACTIONS[c.type]) for c in result.changes]})

    def _check_mesh(self, resource, source, index) -> list:
        if isinstance(resource, api.Mesh) and resource.spec.trust_domain != self.trust_domain:
            return [api.Problem(source, index, f"Mesh {resource.metadata.name}", "spec.trustDomain",
                                f"this controller's CA was made for trust domain '{self.trust_domain}', "
                                f"got '{resource.spec.trust_domain}' (a new trust domain needs a new "
                                "controller init)")]
        return []

    async def _delete_batch(self, req, caller):
        body = req.json()
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise HttpError(400, "BadRequest", 'body must be {"items": [{"kind", "namespace", "name"}, ...]}')
        keys = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise HttpError(400, "BadRequest", f"items[{i}]: needs kind, name and (for namespaced kinds) namespace")
            info = _kind(str(item.get("kind", "")))
            ns = str(item.get("namespace") or "default") if info.namespaced else ""
            keys.append((info.kind, ns, item["name"]))
        return await self._delete(keys, caller)

    async def _delete_one(self, req, caller, key):
        return await self._delete([key], caller)

    async def _delete(self, keys, caller):
        try:
            result = await trio.to_thread.run_sync(self.store.delete, keys)
        except NotFoundError as e:
            raise HttpError(404, "NotFound", f"{e}; nothing was deleted") from None
        self.hub.publish(result.revision)
        log.info("delete by %s: revision %d, %s", caller, result.revision, ", ".join(_ref(c.key) for c in result.changes))
        return Response.json(200, {"resourceVersion": str(result.revision),
                                   "results": [_result(c.object, "deleted") for c in result.changes]})

    # --- watch ---------------------------------------------------------------------------

    async def _watch(self, req, caller, info, namespace):
        """Newline-delimited JSON events after ``resourceVersion``, in order, forever.

        Without ``resourceVersion`` the stream starts with the current state as ADDED events,
        ended by a BOOKMARK. A BOOKMARK also follows every burst of events (so a transaction is
        known to be complete), and comes every few seconds while nothing changes.
        """
        kinds = {info.kind} if info else {_kind(k).kind for k in req.query.get("kind", [])} or None
        namespace = namespace or req.arg("namespace")
        rv_arg = req.arg("resourceVersion")
        snapshot: list[dict] | None = None
        if rv_arg in (None, ""):
            items, since = await trio.to_thread.run_sync(self.store.list, None, namespace)
            snapshot = [o for o in items if kinds is None or o["kind"] in kinds]
        else:
            try:
                since = int(rv_arg)
            except ValueError:
                raise HttpError(400, "BadRequest", f"resourceVersion must be an integer, got {rv_arg!r}") from None
            try:  # fail before the 200 goes out if the start is already compacted away
                await trio.to_thread.run_sync(lambda: self.store.events_since(since, limit=1))
            except CompactedError as e:
                raise HttpError(410, "Gone", f"resourceVersion {since} is too old ({e}); list again and watch from its resourceVersion") from None
        return StreamResponse(200, self._events(since, snapshot, kinds, namespace))

    async def _events(self, since, snapshot, kinds, namespace):
        if snapshot is not None:
            for obj in snapshot:
                yield _line({"type": "ADDED", "object": obj})
            yield _line({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(since)}}})
        events = watch(self.store, self.hub, since, kinds=kinds, namespace=namespace,
                       idle=self.bookmark_every, sync_marks=True)
        async with aclosing(events):
            try:
                async for ev in events:
                    yield _line(ev.to_json())
            except CompactedError as e:
                yield _line({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": str(e)}})


def _only(method: str, allowed: str, verb: str, handler, args):
    if method != allowed:
        raise HttpError(405, "MethodNotAllowed", f"{method} not allowed here; use {allowed}")
    return verb, handler, args


def _kind(name: str):
    try:
        return api.resolve_kind(name)
    except api.UnknownKind as e:
        raise HttpError(404, "NotFound", str(e)) from None


def _ref(key) -> str:
    kind, ns, name = key
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def _result(obj: dict, action: str) -> dict:
    meta = obj["metadata"]
    return {"kind": obj["kind"], "namespace": meta.get("namespace", ""), "name": meta["name"], "action": action}


def _line(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"
