"""`nodemesh check` expiry findings (pure) and the identity commands through the real CLI."""
from __future__ import annotations

import datetime as dt
import os

from controller.cli.check import expiry_findings
from tests.controller.test_controller_process import nodemesh

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.timezone.utc)


def iso(delta: dt.timedelta) -> str:
    return (NOW + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_expiry_findings_warn_inside_the_window_and_fail_when_expired():
    status = {
        "certificates": [{"name": "ca", "serial": "1", "expires": iso(dt.timedelta(days=3650))},
                         {"name": "controller", "serial": "2", "expires": iso(dt.timedelta(days=10))}],
        "nodes": [{"node": "node-1", "nearestExpiry": iso(dt.timedelta(hours=20)), "nearestIdentity": "spiffe://a"},
                  {"node": "node-2", "nearestExpiry": iso(dt.timedelta(hours=2)), "nearestIdentity": "spiffe://b"},
                  {"node": "node-3", "nearestExpiry": iso(-dt.timedelta(minutes=1)), "nearestIdentity": "spiffe://c"},
                  {"node": "node-4", "nearestExpiry": None}],
    }
    found = expiry_findings(status, now=NOW, window=dt.timedelta(hours=6), ca_window=dt.timedelta(days=30))
    levels = [level for level, _ in found]
    assert levels == ["ok", "WARN", "ok", "WARN", "FAIL"]
    assert "node node-2: nearest expiry spiffe://b" in found[3][1] and "(in 2h)" in found[3][1]
    assert "EXPIRED" in found[4][1]


def test_token_status_rotate_and_check_through_the_cli(tmp_path):
    from tests.controller.test_controller_process import Controller
    ctl = Controller(tmp_path)
    ctl.init()
    ctl.start()
    try:
        p = nodemesh("token", "create", "--node", "node-1", "--ttl", "30m", env=ctl.env)
        token = p.stdout.strip()
        assert len(token.split(".")) == 2 and "one-time token for node node-1" in p.stderr
        bad = nodemesh("token", "create", "--node", "node-1", "--ttl", "soon", env=ctl.env, check=False)
        assert bad.returncode == 2 and "--ttl" in bad.stderr
        out = nodemesh("status", env=ctl.env).stdout
        assert "trust domain cluster.local" in out and "none has joined yet" in out
        out = nodemesh("ca", "rotate", "--yes", "--propagation", "0s", env=ctl.env).stdout
        assert out.startswith("new root ") and "signs now" in out
        out = nodemesh("check", "--no-node", env=ctl.env).stdout   # the CLI still works after rotation
        assert out.splitlines()[0].startswith("ok    controller https://127.0.0.1:")
        assert "retired-root certificate" in out
        strict = nodemesh("check", "--no-node", "--strict", "--ca-expiry-window", "87600h", env=ctl.env, check=False)
        assert strict.returncode == 1 and "WARN" in strict.stdout
    finally:
        ctl.stop()


def test_check_on_a_node_without_an_agent_fails_and_says_what_to_run():
    # port 9 (discard) on loopback: nothing of ours listens there, so no agent answers
    p = nodemesh("check", "--no-controller", "--node", "--agent-admin", "http://127.0.0.1:9",
                 "--agent-ready", "http://127.0.0.1:9/healthz/ready", env=dict(os.environ), check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.startswith("FAIL  no agent answers at http://127.0.0.1:9")
    assert "'nodemesh agent check' checks the kernel without one" in p.stdout
