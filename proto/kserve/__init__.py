"""KServe v2 / Triton gRPC protocol: grpc_service.proto and its generated code (generate.sh)."""
