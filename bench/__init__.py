"""nodemesh benchmark harness: our mesh beside direct, haproxy, nginx stream and Envoy.

Run it with ``scripts/bench [SCENARIO...]`` (or ``.venv/bin/python -m bench``). Tooling, not
part of the import packages: nothing under agent/ or controller/ imports it, and numbers are
never asserted by tests. See BENCHMARKS.md for what each scenario measures.
"""
