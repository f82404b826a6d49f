"""Session ids: issued by the server, refused when made up, expired or not ASCII, and kept in the
database only as a hash. Light: `SessionKeys` and a real DuckDB file, no engine."""

from __future__ import annotations

import pytest

from assistant.sessions import SessionKeys, UnknownSessionError


@pytest.fixture
def keys(tmp_path) -> SessionKeys:
    return SessionKeys.load_or_create(tmp_path / "secrets" / "session.key")


@pytest.mark.parametrize("sent", ["ü", "é.ü", "abc.déf", "1.ẞ.x", "\udcff", "١٢٣.x.y"])
def test_a_non_ascii_session_id_is_unknown_not_an_error(keys, sent):
    # hmac.compare_digest raises TypeError on non-ASCII str: the page's every request was a 500
    assert not keys.is_valid(sent)
    with pytest.raises(UnknownSessionError, match="unknown session"):
        keys.check(sent)
    issued = keys.issue()
    assert not keys.is_valid(issued[:-1] + "ü")
