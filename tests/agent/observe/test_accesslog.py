"""AccessLog and connection_record: the line's shape, and that a broken destination never raises."""
from __future__ import annotations

import io
import json
import logging
import re

from agent.observe.accesslog import AccessLog, connection_record, rfc3339

KEYS = ["start_time", "duration_ms", "reporter", "src", "dst", "protocol", "bytes_sent",
        "bytes_received", "security", "decision", "response_flags", "error"]


def denied_record() -> dict:
    return connection_record(
        start_time=1_738_324_800.1234, duration=0.0427, reporter="destination",
        src_address="10.10.2.7", src_workload="api-1", src_namespace="apps",
        src_identity="spiffe://cluster.local/ns/apps/sa/api",
        dst_address="10.10.1.5:5432", dst_workload="db-1", dst_namespace="shop",
        dst_identity="spiffe://cluster.local/ns/shop/sa/db", protocol="hbone",
        bytes_sent=0, bytes_received=12, security="mutual_tls", decision="deny",
        policy="shop/deny-db", rule=0, reason="matched DENY rule", response_flags="DENY")


def test_connection_record_shape():
    rec = denied_record()
    assert list(rec) == KEYS
    assert rec["start_time"] == "2025-01-31T12:00:00.123Z"
    assert rec["duration_ms"] == 43
    assert rec["src"] == {"address": "10.10.2.7", "workload": "api-1", "namespace": "apps",
                          "identity": "spiffe://cluster.local/ns/apps/sa/api"}
    assert rec["dst"] == {"address": "10.10.1.5:5432", "service": None, "workload": "db-1",
                          "namespace": "shop", "identity": "spiffe://cluster.local/ns/shop/sa/db"}
    assert rec["decision"] == {"result": "deny", "policy": "shop/deny-db", "rule": 0,
                               "reason": "matched DENY rule"}
    assert (rec["protocol"], rec["security"], rec["response_flags"], rec["error"]) == \
        ("hbone", "mutual_tls", "DENY", None)
    assert (rec["bytes_sent"], rec["bytes_received"]) == (0, 12)


def test_unknown_values_are_null():
    rec = connection_record(start_time=0, duration=0, reporter="source", src_address="10.10.1.2",
                            src_identity="", error="")
    assert rec["src"]["identity"] is None and rec["error"] is None
    assert rec["dst"] == dict.fromkeys(["address", "service", "workload", "namespace", "identity"])
    assert rec["decision"] == {"result": "allow", "policy": None, "rule": None, "reason": ""}


def test_rfc3339_has_milliseconds_and_utc():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rfc3339(1.5))
    assert rfc3339(1.5) == "1970-01-01T00:00:01.500Z"


class Recording(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def test_one_compact_line_per_record_flushed():
    out = Recording()
    log = AccessLog(out)
    log.write(denied_record())
    assert out.flushes == 1
    log.write(connection_record(start_time=0, duration=1, reporter="source"))
    lines = out.getvalue().split("\n")
    assert lines[2] == "" and len(lines) == 3
    assert json.loads(lines[0]) == denied_record()
    assert ", " not in lines[0] and '": ' not in lines[0]
    assert log.written == 2 and log.dropped == 0


def test_file_path_appends(tmp_path):
    path = tmp_path / "access.log"
    path.write_text('{"earlier":true}\n')
    log = AccessLog(str(path))
    log.write(denied_record())
    log.write(denied_record())
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"earlier":true}' and len(lines) == 3
    assert json.loads(lines[2])["decision"]["policy"] == "shop/deny-db"


class Broken(io.StringIO):
    def __init__(self):
        super().__init__()
        self.broken = True

    def write(self, s):
        if self.broken:
            raise OSError(28, "No space left on device")
        return super().write(s)


def test_a_failing_stream_never_raises_and_logs_once(caplog):
    out = Broken()
    log = AccessLog(out)
    with caplog.at_level(logging.WARNING, logger="nodemesh.agent.accesslog"):
        for _ in range(3):
            log.write(denied_record())
        assert log.dropped == 3 and log.written == 0
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        out.broken = False
        log.write(denied_record())
    assert log.written == 1 and json.loads(out.getvalue())["reporter"] == "destination"
    assert any("works again" in r.getMessage() and "3 lines" in r.getMessage() for r in caplog.records)


def test_an_unwritable_path_drops_lines_and_recovers_when_it_appears(tmp_path):
    path = tmp_path / "not-yet" / "access.log"
    log = AccessLog(path)
    log.write(denied_record())
    assert log.dropped == 1
    path.parent.mkdir()
    log.write(denied_record())
    log.close()
    assert log.written == 1 and len(path.read_text().splitlines()) == 1


def test_an_unserializable_record_is_dropped_not_raised():
    out = io.StringIO()
    log = AccessLog(out)
    loop: dict = {}
    loop["self"] = loop
    log.write(loop)
    log.write({"odd": {1, 2}.__class__})          # default=str copes with other objects
    assert log.dropped == 1 and log.written == 1
    assert out.getvalue().count("\n") == 1


def _reference_record(*, start_time, duration, reporter, src_address=None, src_workload=None,
                      src_namespace=None, src_identity=None, dst_address=None, dst_service=None,
                      dst_workload=None, dst_namespace=None, dst_identity=None, protocol="tcp",
                      bytes_sent=0, bytes_received=0, security="none", decision="allow",
                      policy=None, rule=None, reason="", response_flags="-", error=None) -> dict:
    """The record as the module docstring defines it, built the plain way (a dict for json.dumps)."""
    return {
        "start_time": rfc3339(start_time), "duration_ms": max(0, round(duration * 1000)),
        "reporter": reporter,
        "src": {"address": src_address or None, "workload": src_workload or None,
                "namespace": src_namespace or None, "identity": src_identity or None},
        "dst": {"address": dst_address or None, "service": dst_service or None,
                "workload": dst_workload or None, "namespace": dst_namespace or None,
                "identity": dst_identity or None},
        "protocol": protocol, "bytes_sent": bytes_sent, "bytes_received": bytes_received,
        "security": security,
        "decision": {"result": decision, "policy": policy or None, "rule": rule, "reason": reason},
        "response_flags": response_flags, "error": error or None,
    }


def test_the_hand_built_line_is_exactly_what_json_dumps_writes():
    """connection_line formats by hand for speed; it must equal json.dumps of the plain record
    byte for byte, whatever the strings hold (quotes, backslashes, controls, non-ASCII)."""
    import random
    from agent.observe.accesslog import connection_line
    rng = random.Random(7)
    alphabet = ['a', 'Z', '0', '"', '\\', '/', '\n', '\t', '\x00', '\x1f', '\x7f', 'é', '☃', '\U0001f600', ' ', ':', ',']

    def text():
        return rng.choice(["", None, "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))])

    names = ["src_address", "src_workload", "src_namespace", "src_identity", "dst_address",
             "dst_service", "dst_workload", "dst_namespace", "dst_identity", "policy", "error"]
    for _ in range(500):
        kw = {n: text() for n in names}
        kw.update(start_time=rng.uniform(0, 2e9), duration=rng.choice([0, -1, rng.uniform(0, 1e4)]),
                  reporter=rng.choice(["source", "destination"]), protocol=rng.choice(["tcp", "hbone"]),
                  bytes_sent=rng.randint(0, 1 << 40), bytes_received=rng.randint(0, 1 << 40),
                  security=rng.choice(["none", "mutual_tls"]), decision=rng.choice(["allow", "deny"]),
                  rule=rng.choice([None, 0, 3]), reason=text() or "", response_flags=rng.choice(["-", "UF", "DENY"]))
        want = json.dumps(_reference_record(**kw), separators=(",", ":"), ensure_ascii=False) + "\n"
        assert connection_line(**kw) == want


def test_rfc3339_is_right_across_seconds_in_any_order():
    """rfc3339 remembers the last second's text; it must equal datetime's own formatting."""
    import random
    from datetime import datetime, timezone
    rng = random.Random(3)
    whens = [1_738_324_800.999, 1_738_324_801.0, 5.25, 1_738_324_800.5, 0.0, 86_399.9995, 1.0009999]
    whens += [rng.uniform(0, 4e9) for _ in range(300)] + [1_738_324_800 + i / 997 for i in range(3000)]
    for when in whens:
        want = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
        assert rfc3339(when) == want.replace("+00:00", "Z"), when
