"""admin.py: what the agent's three HTTP ports serve — admin (15000, on 127.0.0.1), Prometheus
metrics (15020) and readiness (15021) — as route tables for ``serve_http``.

Owns the endpoints' shapes, not their data: every route reads a callable it was given. The one
write is ``POST /logging``, which changes the levels of the ``nodemesh`` loggers the way
Envoy's admin ``/logging`` does.
"""
from __future__ import annotations

import inspect
import logging
from typing import Awaitable, Callable, Union

from agent.observe.httpd import Handler, Reply, Request, Route, json_reply, serve_http, text_reply
from agent.observe.metrics import CONTENT_TYPE, AgentMetrics

__all__ = ["admin_routes", "metrics_routes", "ready_routes", "serve_http", "LEVELS", "logger_levels",
           "set_logger_levels", "LoggingError"]

ROOT_LOGGER = "nodemesh"

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


def admin_routes(
    *,
    config_dump: Callable[[], dict],
    certs: Callable[[], list[dict]],
    workloads: Callable[[], list[dict]],
) -> dict[str, Handler | Route]:
    """Routes for the admin port (15000). Bind it to 127.0.0.1 only: it shows config and can
    change log levels.

    ``/config_dump``, ``/certs``, ``/workloads``: JSON of what the callables return (they may
    be async). ``/logging``: GET lists the ``nodemesh`` loggers' effective levels; POST
    ``?level=debug`` sets every one of them, ``?nodemesh.agent.sync=debug`` just that one (all
    or nothing; 400 names a bad level or unknown logger; 403 when the request carries an
    ``Origin`` header, so a web page cannot change levels). ``/`` lists the endpoints.
    """
    routes: dict[str, Handler | Route] = {
        "/config_dump": _json_of(config_dump),
        "/certs": _json_of(certs),
        "/workloads": _json_of(workloads),
        "/logging": Route(get=_logging_get, post=_logging_post),
    }
    routes["/"] = lambda: json_reply({"endpoints": sorted(routes)})
    return routes


def metrics_routes(metrics: AgentMetrics) -> dict[str, Handler | Route]:
    """Routes for the metrics port (15020): ``/metrics`` in the Prometheus text format."""
    return {"/metrics": lambda: (200, CONTENT_TYPE, metrics.render())}


def ready_routes(ready: Callable[[], tuple[bool, str]]) -> dict[str, Handler | Route]:
    """Routes for the readiness port (15021): ``/healthz/ready`` answers 200 ``ready`` (with what
    ``ready()`` says, e.g. the version served) or 503 with the reason (or the error it raised)."""

    def healthz() -> Reply:
        try:
            ok, reason = ready()
        except Exception as e:  # a broken check means not ready, never a 500
            return text_reply(f"readiness check failed: {type(e).__name__}: {e}", 503)
        if ok:
            return text_reply(f"ready: {reason}" if reason else "ready")
        return text_reply(reason or "not ready", 503)

    return {"/healthz/ready": healthz}


def _json_of(source: Callable[[], Union[object, Awaitable[object]]]) -> Callable[[], Awaitable[Reply]]:
    async def handler() -> Reply:
        value = source()
        if inspect.isawaitable(value):
            value = await value
        return json_reply(value)
    return handler


# --- /logging -----------------------------------------------------------------------------

class LoggingError(ValueError):
    """A /logging request names an unknown logger or level."""


def logger_levels() -> dict[str, str]:
    """Effective level of ``nodemesh`` and every existing ``nodemesh.*`` logger, by name."""
    names = {ROOT_LOGGER} | {name for name, lg in logging.root.manager.loggerDict.items()
                             if isinstance(lg, logging.Logger) and name.startswith(ROOT_LOGGER + ".")}
    return {name: logging.getLevelName(logging.getLogger(name).getEffectiveLevel()).lower()
            for name in sorted(names)}


def set_logger_levels(changes: dict[str, str]) -> None:
    """Apply ``{"level": lvl}`` (every nodemesh logger) and/or ``{logger name: lvl}``.

    Validates everything first, then applies; raises LoggingError.
    """
    if not changes:
        raise LoggingError("nothing to change: use ?level=<level> or ?<logger>=<level>")
    known = logger_levels()
    plan: list[tuple[list[str], int]] = []
    for name, level in changes.items():
        value = LEVELS.get(level.lower())
        if value is None:
            raise LoggingError(f"unknown level {level!r} for {name}; use one of {', '.join(sorted(LEVELS))}")
        if name == "level":
            plan.insert(0, (list(known), value))      # "all" first, so named ones win
        elif name in known:
            plan.append(([name], value))
        else:
            raise LoggingError(f"unknown logger {name!r}; known: {', '.join(known)}")
    for names, value in plan:
        for name in names:
            logging.getLogger(name).setLevel(value)


def _logging_get(req: Request) -> Reply:
    return json_reply({"loggers": logger_levels()})


def _logging_post(req: Request) -> Reply:
    if "origin" in req.headers:
        return json_reply({"error": "POST /logging with an Origin header is refused"}, 403)
    changes = {}
    for name, values in req.query.items():
        if len(values) != 1:
            return json_reply({"error": f"{name} given {len(values)} times"}, 400)
        changes[name] = values[0]
    try:
        set_logger_levels(changes)
    except LoggingError as e:
        return json_reply({"error": str(e)}, 400)
    logging.getLogger("nodemesh.agent.admin").info("log levels changed: %s", changes)
    return json_reply({"loggers": logger_levels()})
