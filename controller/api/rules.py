"""The rules both decoders apply: the one source of truth for what a document may say.

Owns the field names each object allows, the allowed values of each enum (and the value an
absent one takes), the port range, and the per-value checks that ``decode.py`` (the detailed
validator, which words every error with its path) and ``decode_fast.py`` (the exact fast path)
share, so the two cannot disagree on a rule. The DNS-1123 and label syntax itself is
``meta.py``'s; which field takes which syntax is said here. Pure: no I/O, no paths, no error lists.
"""
from __future__ import annotations

import posixpath
from functools import lru_cache

from controller.api.errors import shown
from controller.api.meta import dns_label_error, dns_subdomain_error, label_key_error, label_value_error

# --- the fields each object allows, in the order messages list them -----------------------------
TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec")
SERVER_META_FIELDS = ("uid", "resourceVersion", "creationTimestamp")   # strings the server sets
META_FIELDS = ("name", "namespace", "labels", "annotations") + SERVER_META_FIELDS
WORKLOAD_FIELDS = ("node", "serviceAccount", "addresses", "locality", "netns", "cgroup", "ports")
LOCALITY_FIELDS = ("region", "zone", "subzone")
SERVICE_FIELDS = ("addresses", "selector", "ports", "loadBalancer")
SERVICE_PORT_FIELDS = ("name", "port", "targetPort", "protocol")
LOAD_BALANCER_FIELDS = ("algorithm", "localityFailover")

# --- enums: the allowed values, and the value of an absent (or null) field ----------------------
PROTOCOLS = ("tcp", "http", "http2")                               # a Service port's protocol
DEFAULT_PROTOCOL = "tcp"
ALGORITHMS = ("random", "round_robin", "least_request", "ewma")    # loadBalancer.algorithm
DEFAULT_ALGORITHM = "ewma"
DEFAULT_LOCALITY_FAILOVER = True                                    # loadBalancer.localityFailover
DEFAULT_SERVICE_ACCOUNT = "default"                                 # a Workload's serviceAccount

MIN_PORT, MAX_PORT = 1, 65535                                       # every port number, inclusive

# --- which syntax each name-like field takes (each check: the reason it fails, or None) ---------
name_error = dns_subdomain_error              # metadata.name
namespace_error = dns_label_error             # metadata.namespace
node_error = dns_subdomain_error              # a Workload's node
service_account_error = dns_subdomain_error   # a Workload's serviceAccount
port_name_error = dns_label_error             # a Service port's name, when not empty


def abs_path_error(s: str) -> str | None:
    """Why ``s`` is not an absolute path without '..' or NUL (a Workload's netns), or None."""
    if not s.startswith("/"):
        return f"must be an absolute path, got {shown(s)}"
    if "\0" in s or ".." in s.split("/"):
        return f"must be an absolute path without '..' or NUL, got {shown(s)}"
    return None


def cgroup_error(s: str) -> str | None:
    """Why ``s`` is not such a path under /sys/fs/cgroup (a Workload's cgroup v2), or None."""
    reason = abs_path_error(s)
    if reason:
        return reason
    if posixpath.normpath(s) != "/sys/fs/cgroup" and not s.startswith("/sys/fs/cgroup/"):
        return f"must be a path under /sys/fs/cgroup, got {shown(s)}"
    return None


# label keys and values repeat across objects; the checks are pure, so their answers are kept
_key_error = lru_cache(maxsize=4096)(label_key_error)
_value_error = lru_cache(maxsize=4096)(label_value_error)


def string_map_ok(d: dict, labels: bool) -> bool:
    """True when every key of ``d`` is a str label key and every value a str (a label value too
    when ``labels``): a valid label map, or annotation map with ``labels=False``. False says
    no more than "not certainly": a subclass of str, say, is left to the detailed check."""
    for k, val in d.items():
        if type(k) is not str or type(val) is not str or _key_error(k) is not None:
            return False
        if labels and _value_error(val) is not None:
            return False
    return True
