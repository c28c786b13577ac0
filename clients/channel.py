"""Channels for the recserve clients: TLS / mutual TLS, retries, keepalive, message sizes.

    options = ChannelOptions(tls_ca="ca.pem", tls_cert="client.pem", tls_key="client-key.pem")
    channel = make_channel("recserve.internal:8500", options)            # grpc.Channel
    channel = make_channel("recserve.internal:8500", options, aio=True)  # grpc.aio.Channel

Retries are gRPC's own (a retry policy in the channel's service config): a call that fails
with UNAVAILABLE (server draining, model loading, connection refused) is retried with
exponential backoff, up to ``max_attempts`` in all and within the call's deadline; no other
status is retried, so a request is never sent twice after the server may have acted on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICES = ("recserve.v1.RecommendService", "recserve.v1.FeatureService", "recserve.v1.ModelService")


@dataclass(frozen=True)
class ChannelOptions:
    tls_ca: str | None = None  # PEM bundle to verify the server (TLS on when any tls_* is set)
    tls_cert: str | None = None  # client certificate for mutual TLS
    tls_key: str | None = None
    tls_server_name: str | None = None  # override the name checked in the server certificate
    max_attempts: int = 3  # per call, UNAVAILABLE only; 1: no retries
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    keepalive_s: float = 30.0  # ping an idle connection this often (0: never)
    max_message_bytes: int = 16 << 20  # largest reply (and request) accepted

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert or self.tls_key)

    def grpc_options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [("grpc.max_receive_message_length", self.max_message_bytes),
                                          ("grpc.max_send_message_length", self.max_message_bytes)]
        if self.max_attempts > 1:
            policy = {"maxAttempts": self.max_attempts, "initialBackoff": f"{self.initial_backoff_s}s",
                      "maxBackoff": f"{self.max_backoff_s}s", "backoffMultiplier": 2,
                      "retryableStatusCodes": ["UNAVAILABLE"]}
            config = {"methodConfig": [{"name": [{"service": s} for s in SERVICES], "retryPolicy": policy}]}
            opts += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
        else:
            opts.append(("grpc.enable_retries", 0))
        if self.keepalive_s > 0:
            opts += [("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)), ("grpc.keepalive_timeout_ms", 10_000)]
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return opts

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("mutual TLS needs both tls_cert and tls_key")
        return grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca), private_key=read(self.tls_key),
                                            certificate_chain=read(self.tls_cert))


def make_channel(target: str, options: ChannelOptions | None = None, aio: bool = False):
    options = options or ChannelOptions()
    lib = grpc.aio if aio else grpc
    if options.tls:
        return lib.secure_channel(target, options.credentials(), options=options.grpc_options())
    return lib.insecure_channel(target, options=options.grpc_options())
