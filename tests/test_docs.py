"""The API reference in docs/ is generated from the docstrings and must be current."""

from __future__ import annotations

import os
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_api_reference_is_current():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gen_api_reference

    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        assert f.read() == gen_api_reference.main(), "run: python tools/gen_api_reference.py"
