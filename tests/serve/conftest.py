"""The ``server`` fixture: one fake-engine and one real-engine server per test session.

Both require an API key, so every test also checks that a client with the key gets through,
and each session ends with a SIGTERM that must exit 0.
"""

from __future__ import annotations

import pytest
from serve_servers import REAL_ARGS, start_server


@pytest.fixture(scope="session", params=["fake", "real"])
def server(request: pytest.FixtureRequest):
    extra = REAL_ARGS if request.param == "real" else ()
    srv = start_server(request.param, *extra)
    try:
        yield srv
    finally:
        returncode = srv.stop()
        log = srv.log()
        srv.log_path.unlink(missing_ok=True)
    # Every session ends with a graceful SIGTERM shutdown, which must exit 0.
    assert returncode == 0, f"{srv.kind} server exited {returncode} on SIGTERM:\n{log[-3000:]}"
