"""Optional test dependencies: skipped with a clear message where absent, required in CI.

``.ci/run`` sets ``TIGEROPT_REQUIRE_OPTIONAL=1``: there a missing cross-check library is a
failure, not a silent skip (they are in the ``[test]`` extra).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(name: str, why: str) -> ModuleType:
    """Import ``name``; skip the test (or fail, in CI) with ``why`` when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f"{name} is not installed ({why}); pip install -e '.[test]'"
        if os.environ.get("TIGEROPT_REQUIRE_OPTIONAL") == "1":
            pytest.fail(f"{message} -- required in CI (TIGEROPT_REQUIRE_OPTIONAL=1): {exc}")
        pytest.skip(message)
