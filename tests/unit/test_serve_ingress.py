"""The Serve ingress environment, `serve run/list/stop` routing, route prefixes, port holders (issue 16)."""

from __future__ import annotations

import os
import socket

import pytest
from typer.testing import CliRunner

from scalelab import cli
from scalelab.cluster.services import port_holder, port_in_use
from scalelab.cluster.session import serve_ingress_env
from scalelab.errors import ConfigError
from scalelab.serve import commands


def test_default_ingress_is_haproxy_with_a_client_timeout_and_private_ports(monkeypatch):
    monkeypatch.delenv("SCALELAB_SERVE_INGRESS", raising=False)
    for key in list(os.environ):
        if key.startswith("RAY_SERVE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SCALELAB_SERVE_CLIENT_TIMEOUT_S", "7")
    env = serve_ingress_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "7"
    # Ray's fixed 8404/9101 (on all interfaces) would clash between two clusters on one machine
    assert (
        env["RAY_SERVE_HAPROXY_STATS_PORT"] not in ("8404", "")
        and env["RAY_SERVE_HAPROXY_METRICS_PORT"] != "9101"
    )
    monkeypatch.setenv("RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S", "3")  # what the user set wins
    assert serve_ingress_env()["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "3"
    # ... but ports inherited from a process holding a cluster are not reused (they are taken)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", env["RAY_SERVE_HAPROXY_STATS_PORT"])
    assert serve_ingress_env()["RAY_SERVE_HAPROXY_STATS_PORT"] != env["RAY_SERVE_HAPROXY_STATS_PORT"]
    monkeypatch.setenv("SCALELAB_SERVE_HAPROXY_STATS_PORT", "18404")
    assert serve_ingress_env()["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_proxy_ingress_and_a_bad_value(monkeypatch):
    from scalelab.serve.guard import PROXY_CALLBACK_ENV

    monkeypatch.setenv("SCALELAB_SERVE_INGRESS", "proxy")
    assert serve_ingress_env() == {"RAY_SERVE_ENABLE_HA_PROXY": "0", **PROXY_CALLBACK_ENV}
    monkeypatch.delenv("SCALELAB_SERVE_INGRESS")
    assert PROXY_CALLBACK_ENV.items() <= serve_ingress_env().items()  # the header guard, either way
    monkeypatch.setenv("SCALELAB_SERVE_INGRESS", "nginx")
    with pytest.raises(ConfigError, match="haproxy"):
        serve_ingress_env()


def test_serve_name_is_serve_run_name_and_list_stop_are_verbs():
    runner = CliRunner()
    out = runner.invoke(cli.app, ["serve", "digits", "--help"])
    assert out.exit_code == 0 and "serve run" in out.output and "--emit-config" in out.output
    out = runner.invoke(cli.app, ["serve", "stop", "--help"])
    assert out.exit_code == 0 and "the others keep serving" in out.output
    out = runner.invoke(cli.app, ["serve", "--help"])
    assert all(verb in out.output for verb in ("run", "list", "stop"))


def test_route_prefixes_first_app_keeps_slash_others_get_their_name(monkeypatch):
    apps: dict = {}
    monkeypatch.setattr(commands, "serve_details", lambda: {"applications": apps})
    assert commands.choose_route_prefix("scalelab-a", "a", "/") == "/"
    apps["scalelab-a"] = {"route_prefix": "/"}
    assert commands.choose_route_prefix("scalelab-a", "a", "/") == "/"  # redeploy keeps its prefix
    assert commands.choose_route_prefix("scalelab-b", "b", "/") == "/b"
    apps["scalelab-b"] = {"route_prefix": "/b"}
    assert commands.choose_route_prefix("scalelab-b", "b", "/") == "/b"  # redeploy keeps /b
    assert commands.choose_route_prefix("scalelab-b", "b", "/b2") == "/b2"  # ... unless the recipe moves it
    apps["other"] = {"route_prefix": "/c"}
    with pytest.raises(ConfigError, match="taken by application 'other'"):
        commands.choose_route_prefix("scalelab-c", "c", "/")
    with pytest.raises(ConfigError, match="also a route"):
        commands.choose_route_prefix("scalelab-v1", "v1", "/")


def test_a_held_port_is_refused_naming_the_holder():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        assert port_holder(port).startswith(f"pid {os.getpid()} ")
        with pytest.raises(
            Exception, match=f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()}"
        ):
            commands.refuse_held_port("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)
