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
