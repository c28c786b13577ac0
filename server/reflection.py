"""Server reflection that also resolves method names (what ghz asks for).

    enable_reflection(server, ["recserve.v1.RecommendService", ...])

grpcio-reflection answers ``file_containing_symbol`` from the protobuf descriptor pool,
and the Python pool does not know method symbols (``pkg.Service.Method``; grpc/grpc#34743),
so ghz and ``grpcurl describe pkg.Service.Method`` got "Symbol not found". The pool is
wrapped so that a method symbol resolves to its service's file; everything else is the
pool's own answer.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection


class _MethodAwarePool:
    def __init__(self, pool):
        self._pool = pool

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 (the pool's API)
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in service.methods_by_name:
                raise
            return service.file


def enable_reflection(server, service_names) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=_MethodAwarePool(descriptor_pool.Default()))
