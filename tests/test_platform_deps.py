"""tests/platform_deps.py: a missing platform dependency skips a test, or fails it where CI requires
the platform tests (Linux x86-64 with the flag set)."""
import platform

import platform_deps
import pytest


@pytest.mark.parametrize('flag, machine, outcome', [
    ('1', 'x86_64', pytest.fail.Exception), ('', 'x86_64', pytest.skip.Exception),
    ('0', 'x86_64', pytest.skip.Exception), ('1', 'aarch64', pytest.skip.Exception)])
def test_a_missing_dependency_fails_only_where_required(flag, machine, outcome, monkeypatch):
    monkeypatch.setenv(platform_deps.FLAG, flag)
    monkeypatch.setattr(platform_deps.sys, 'platform', 'linux')
    monkeypatch.setattr(platform, 'machine', lambda: machine)
    with pytest.raises(outcome) as raised:
        platform_deps.missing('fusermount3 is missing: apt-get install fuse3')
    assert str(raised.value).startswith('fusermount3 is missing: apt-get install fuse3')
    if outcome is pytest.fail.Exception:
        assert 'ALLFLAX_REQUIRE_PLATFORM_TESTS=1' in str(raised.value)
