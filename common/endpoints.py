"""Broker addresses as users write them (``HOST:PORT``) and as ZeroMQ wants them."""

from __future__ import annotations

from dataclasses import dataclass

from p2pchat.common.errors import P2PChatError


@dataclass(frozen=True, slots=True)
class ServerAddress:
    host: str = "127.0.0.1"
    port: int = 5555
    pub_port: int | None = None  # the broker's convention: port + 1

    @classmethod
    def parse(cls, text: str, pub_port: int | None = None) -> ServerAddress:
        host, sep, port = text.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
            raise P2PChatError(f"server must be HOST:PORT with a port from 1 to 65534, got {text!r}")
        return cls(host, int(port), pub_port)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self._host()}:{self.port}"

    @property
    def pub_endpoint(self) -> str:
        return f"tcp://{self._host()}:{self.pub_port or self.port + 1}"

    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return f"{self._host()}:{self.port}"
