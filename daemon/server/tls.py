"""TLS for the admin API over TCP: the server's certificate, and client certificates required."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None) -> grpc.ServerCredentials:
    if not (cert and key and client_ca):
        raise ValueError("the admin API listens on TCP only with TLS and client certificates: "
                         "give --admin-tls-cert, --admin-tls-key and --admin-client-ca")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                       root_certificates=client_ca.read_bytes(), require_client_auth=True)


def channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(), private_key=key.read_bytes(),
                                        certificate_chain=cert.read_bytes())
