"""The agent's start path imports only what an idle agent needs (BENCHMARKS "(e) memory").

Each check runs in a fresh interpreter and reads ``sys.modules``: a heavy library that creeps
back onto the start path (an import at the top of a module) fails here, long before anyone
measures RSS again. Numbers are never asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Not on the start path: the redirect modes' kernel libraries (imported only by the mode that
# needs them), httpx and its stack (the agent's control-plane client speaks h11), and
# prometheus_client (imported at the first scrape of /metrics), and yaml (the agent reads no
# manifests; controller.api loads it on first use of its manifest functions).
NOT_AT_START = ("bcc", "pyroute2", "httpx", "httpcore", "anyio", "certifi", "pygments", "prometheus_client",
                "yaml")


def loaded_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    return {name.split(".")[0] for name in json.loads(out.splitlines()[-1])}


@pytest.mark.parametrize("code", [
    "import agent.app",
    "import controller.cli.root, agent.cli",                    # what `nodemesh agent run` loads
    "from agent.redirect import select; select.make('none'); select.make('iptables')",
])
def test_start_path_leaves_heavy_libraries_alone(code):
    assert loaded_after(code).isdisjoint(NOT_AT_START), sorted(loaded_after(code) & set(NOT_AT_START))


def test_metrics_import_prometheus_client_at_the_first_scrape():
    code = ("from agent.observe.metrics import AgentMetrics, ConnectionLabels\n"
            "m = AgentMetrics(config_version=lambda: 1)\n"
            "m.connection_opened(ConnectionLabels('source'))\n")
    assert "prometheus_client" not in loaded_after(code)
    assert "prometheus_client" in loaded_after(code + "assert b'nodemesh_config_version 1.0' in m.render()\n")
