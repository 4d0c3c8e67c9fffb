"""The hypothesis profiles of tests/conftest.py: the default one is deterministic, the others explore."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings


def test_default_profile_is_deterministic_and_keeps_no_database():
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None
    if "HYPOTHESIS_PROFILE" not in os.environ:
        assert settings.default.derandomize and settings.default.database is None
        assert settings.default.max_examples == ci.max_examples


@pytest.mark.parametrize("name,at_least", [("explore", 25), ("thorough", 1000)])
def test_exploring_profiles_draw_at_random(name, at_least):
    profile = settings.get_profile(name)
    assert not profile.derandomize and profile.max_examples >= at_least
