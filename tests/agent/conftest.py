"""Agent tests reuse the controller fixtures: a real controller in-process over real TLS."""
from tests.controller.conftest import controller, data_dir  # noqa: F401 (pytest fixtures)
