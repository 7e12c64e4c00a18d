"""Client package for runsvc: generated stubs in runsvc_client.v1.

Import the messages from ``runsvc_client.v1.run_service_pb2`` and the
``RunServiceStub`` from ``runsvc_client.v1.run_service_pb2_grpc``.
"""

__all__: list[str] = []
