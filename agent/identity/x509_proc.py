"""x509_proc.py: keys, CSRs and certificate checks in a short-lived child process, so that the
agent never imports cryptography (~6–10 MB of its RSS; BENCHMARKS "(e) memory").

Owns the wire to ``agent.identity.x509``: a batch of operations as JSON on the child's stdin,
one outcome per operation as JSON on its stdout, and the child's failures as ``X509ChildError``.
Private keys cross only these pipes, never argv, the environment or the log. ``run_in_child``
is what the agent uses; ``run_in_process`` does the same work in this process (tests on trio's
mock clock, where a wait for a child would let the clock jump). Imports neither cryptography nor
x509 at the top, and trio only in ``run_in_child`` (the child starts faster without it).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from agent.identity.certinfo import Leaf
from agent.identity.errors import BadBundle, BadCertificate, X509ChildError

CHILD_TIMEOUT = 30.0                   # seconds; a batch takes ~0.2 s, most of it Python's start
CHILD = ("-c", "from agent.identity.x509_proc import main; main()")   # sys.executable's arguments
ROOT = Path(__file__).resolve().parents[2]   # holds the agent package: the repo, or site-packages

Op = dict        # one operation, as sent: {"op": name, ...}; made by the functions below
Outcome = object  # an operation's value, or the BadCertificate/BadBundle/ValueError it raised
Runner = Callable[[Sequence[Op]], Awaitable[list[Outcome]]]


# --- operations (what x509's functions take; see there for what each checks) ------------------

def key_and_csr(uri: str) -> Op:
    """A new key and a CSR for ``uri`` signed by it: outcome ``(key_pem, csr_pem)``."""
    return {"op": "key_and_csr", "uri": uri}


def check_bundle(bundle_pem: bytes) -> Op:
    """``x509.check_bundle``: outcome the number of roots, or ``BadBundle``."""
    return {"op": "check_bundle", "bundle": _text(bundle_pem)}


def check_chain(uri: str, chain_pem: bytes, bundle_pem: bytes, key_pem: bytes, now: dt.datetime) -> Op:
    """``x509.check_chain`` at ``now`` (timezone-aware): outcome a ``Leaf``, ``BadCertificate``
    or ``ValueError`` (a key that is no P-256 key)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return {"op": "check_chain", "uri": uri, "chain": _text(chain_pem), "bundle": _text(bundle_pem),
            "key": _text(key_pem), "now": now.isoformat()}


def value(outcome: Outcome):
    """The outcome's value; raises it if it is an error."""
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


# --- running them ---------------------------------------------------------------------------

async def run_in_child(ops: Sequence[Op], *, timeout: float = CHILD_TIMEOUT) -> list[Outcome]:
    """Run ``ops`` in one child process; one outcome per op, in order, errors returned not raised.

    Raises ``X509ChildError`` when the child cannot start, crashes, is killed, answers nonsense
    or takes longer than ``timeout`` seconds (it is killed then).
    """
    import trio
    if not ops:
        return []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process([sys.executable, *CHILD], stdin=json.dumps(list(ops)).encode(),
                                          capture_stdout=True, capture_stderr=True, check=False,
                                          cwd=str(ROOT), env=env, deliver_cancel=_kill)
    except trio.TooSlowError:
        raise X509ChildError(f"no answer within {timeout:g}s (killed)") from None
    except OSError as e:
        raise X509ChildError(f"cannot start {sys.executable}: {e}") from None
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
        raise X509ChildError(f"the child {_how(done.returncode)}" + (f": {last}" if last else ""))
    try:
        answers = json.loads(done.stdout)
    except ValueError:
        answers = None
    if not isinstance(answers, list) or len(answers) != len(ops):     # not echoed: it may hold keys
        raise X509ChildError(f"unreadable answer to {len(ops)} operations ({len(done.stdout)} bytes)")
    return [_decode(op, answer) for op, answer in zip(ops, answers)]


async def run_in_process(ops: Sequence[Op]) -> list[Outcome]:
    """``run_in_child`` without the child: the same wire (JSON both ways), in this process."""
    return [_decode(op, answer) for op, answer in zip(ops, _serve(json.loads(json.dumps(list(ops)))))]


def main() -> None:
    """The child: a JSON batch on stdin, its outcomes as JSON on stdout. A bug is a traceback."""
    sys.stdout.write(json.dumps(_serve(json.load(sys.stdin))))


async def _kill(process) -> None:
    process.kill()


def _how(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _serve(ops: list[Op]) -> list[dict]:
    """Each op's outcome on the wire: {"ok": value} or {"error": type, ...}. Imports x509."""
    from agent.identity import x509
    answers = []
    for op in ops:
        try:
            if op["op"] == "key_and_csr":
                key = x509.new_key_pem()
                result = [_text(key), _text(x509.csr_pem(op["uri"], key))]
            elif op["op"] == "check_bundle":
                result = x509.check_bundle(_bytes(op["bundle"]))
            elif op["op"] == "check_chain":
                leaf = x509.check_chain(op["uri"], _bytes(op["chain"]), _bytes(op["bundle"]),
                                        _bytes(op["key"]), dt.datetime.fromisoformat(op["now"]))
                result = [leaf.not_before.isoformat(), leaf.not_after.isoformat(), leaf.serial]
            else:
                raise LookupError(f"unknown operation {op['op']!r}")
        except BadCertificate as e:
            answers.append({"error": "BadCertificate", "uri": e.uri, "reason": e.reason})
        except BadBundle as e:
            answers.append({"error": "BadBundle", "reason": e.reason})
        except ValueError as e:
            answers.append({"error": "ValueError", "message": str(e)})
        else:
            answers.append({"ok": result})
    return answers


def _decode(op: Op, answer: dict) -> Outcome:
    error = answer.get("error") if isinstance(answer, dict) else "?"
    if error is None and "ok" in answer:
        result = answer["ok"]
        if op["op"] == "key_and_csr":
            return _bytes(result[0]), _bytes(result[1])
        if op["op"] == "check_chain":
            return Leaf(dt.datetime.fromisoformat(result[0]), dt.datetime.fromisoformat(result[1]), result[2])
        return result
    if error == "BadCertificate":
        return BadCertificate(answer["uri"], answer["reason"])
    if error == "BadBundle":
        return BadBundle(answer["reason"])
    if error == "ValueError":
        return ValueError(answer["message"])
    raise X509ChildError(f"unreadable answer to {op['op']}: error {error!r}")


def _text(pem: bytes) -> str:
    return bytes(pem).decode("latin-1")     # any bytes, losslessly: a broken file stays as broken


def _bytes(text: str) -> bytes:
    return text.encode("latin-1")
