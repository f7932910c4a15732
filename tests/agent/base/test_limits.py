"""The agent's file-descriptor budget: the plan, and a real process's limit raised and warned about."""
from __future__ import annotations

import resource
import subprocess
import sys

from agent.base.limits import LOW, WANT, low_warning, plan_nofile

INF = resource.RLIM_INFINITY


def test_the_soft_limit_goes_as_far_as_the_hard_limit_allows():
    assert plan_nofile(1024, 524288) == 524288
    assert plan_nofile(1024, INF) == WANT
    assert plan_nofile(1024, 4 * WANT) == WANT
    assert plan_nofile(2 * WANT, 4 * WANT) == 2 * WANT      # never lowered
    assert plan_nofile(1024, 1024) == 1024


def test_a_low_limit_is_said_with_what_to_do():
    assert low_warning(LOW) is None and low_warning(INF) is None
    text = low_warning(4096)
    assert "4096" in text and "about 2048 connections" in text and "LimitNOFILE" in text


def _child(soft: int, hard: int, low: int = LOW) -> subprocess.CompletedProcess:
    code = ("import logging, resource, sys\n"
            "logging.basicConfig(stream=sys.stderr, format='%(levelname)s %(message)s')\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
            "from agent.base.limits import raise_nofile\n"
            f"print(raise_nofile({low}), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)


def test_a_process_gets_its_hard_limit_and_a_warning_when_that_is_low():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = WANT if hard == INF else min(hard, WANT)   # lowering the hard limit needs no privilege
    plenty = _child(256, hard, low=hard)        # as much as asked for: no warning
    assert plenty.stdout.split() == [str(hard)] * 2 and "WARNING" not in plenty.stderr
    low = _child(256, 4096)                     # the default threshold: 4096 is low
    assert low.stdout.split() == ["4096", "4096"]
    assert "WARNING file-descriptor limit is 4096" in low.stderr
