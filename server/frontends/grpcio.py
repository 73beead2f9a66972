"""The grpc.aio front end: the reference implementation of the wire surface, and the
fallback where the native extension is not installed.

The servicers are registered as they are (their methods wrapped once by ``map_errors``), the
bearer-token check is one interceptor (only when a token is set), and grpc.health.v1 and
reflection (v1 and v1alpha) come from grpcio's own packages.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from tensorgate.protos import admin_pb2, admin_pb2_grpc
from tensorgate.protos import grpc_service_pb2 as pb
from tensorgate.protos import grpc_service_pb2_grpc as pb_grpc

from ..admin import ADMIN_SERVICE
from ..auth import AuthInterceptor
from ..credentials import GrpcTls, TlsMaterial
from ..interceptors import map_errors
from ..reflection import MethodAwareReflectionServicer
from .base import Services

INFERENCE = "GRPCInferenceService"
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name[INFERENCE].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class GrpcioFrontEnd:
    name = "python"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.port = 0
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tls: GrpcTls | None = None

    async def start(self) -> None:
        s = self.services.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
        ]
        # Errors become statuses inside each servicer method (map_errors); the token check
        # is the only interceptor, and only when a token is set.
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.services.tokens.enabled:
            interceptors.append(AuthInterceptor(self.services.tokens))
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            map_errors(
                self.services.inference, pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
            ),
            server,
        )
        admin_pb2_grpc.add_RoutingAdminServicer_to_server(
            map_errors(self.services.admin, admin_pb2.DESCRIPTOR.services_by_name["RoutingAdmin"]),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._add_reflection(server)
        credentials = self._tls_credentials()
        if credentials is not None:
            self.port = server.add_secure_port(f"{s.host}:{s.port}", credentials)
        else:
            self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise OSError(f"could not bind gRPC port {s.host}:{s.port}")
        await server.start()
        self._server = server

    def _tls_credentials(self) -> grpc.ServerCredentials | None:
        """TLS for the gRPC port when a certificate is configured; with a client CA, clients
        must present a certificate it signed (mutual TLS). Dynamic credentials: each new
        handshake takes the material of the last ``reload_tls``."""
        self._tls = GrpcTls.from_settings(self.services.settings)
        return self._tls.credentials() if self._tls is not None else None

    def reload_tls(self, cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None) -> None:
        """New connections use this certificate chain, key and client CA (checked by the
        caller, server/credentials.py); open connections keep theirs."""
        if self._tls is None:
            raise ValueError("the gRPC port was started without TLS")
        self._tls.update(TlsMaterial(cert_pem, key_pem, client_ca_pem))

    def _add_reflection(self, server: grpc.aio.Server) -> None:
        names = (
            INFERENCE_SERVICE,
            ADMIN_SERVICE,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
            REFLECTION_V1,
        )
        servicer = MethodAwareReflectionServicer(names)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
        # grpc.reflection.v1 has the same messages as v1alpha under another package name, so
        # the same servicer answers both (grpcurl asks v1 first, ghz v1alpha).
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    REFLECTION_V1,
                    {
                        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                            servicer.ServerReflectionInfo,
                            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                        )
                    },
                ),
            )
        )

    async def set_health(self, service: str, serving: bool) -> None:
        await self.health.set(
            service,
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    async def enter_graceful_shutdown(self) -> None:
        await self.health.enter_graceful_shutdown()

    def end_streams(self) -> None:
        self.services.inference.end_streams()

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
