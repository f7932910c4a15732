"""agent: the node agent — one per host — and its node proxy.

Arranged by layer, one package each (README "Layout"; checked by the import-linter contracts
in pyproject.toml): cli > app | lab > http > proxy | redirect | sync > identity | observe >
decide > state > base. The agent imports nothing of the controller but ``controller.api``.
"""
