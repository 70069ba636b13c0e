#!/usr/bin/env bash
# Regenerates grpc_service_pb2.py and grpc_service_pb2_grpc.py from grpc_service.proto.
# Needs grpcio-tools (a development tool only: the generated code is committed, so serving
# needs just grpcio and protobuf). Use grpcio-tools 1.81.x: later versions emit code for
# protobuf 7, which tritonclient (protobuf < 7) cannot share an environment with.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}

"$PYTHON" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
  proto/kserve/grpc_service.proto

# Register our messages in a private descriptor pool instead of the process-wide default.
# tritonclient registers Triton's own grpc_service.proto with the same message names
# (inference.ModelInferRequest, ...); two such files in one pool refuse to load together,
# so without this a process could not hold both a Tandem server and a Triton client.
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
  proto/kserve/grpc_service_pb2.py
grep -q '_descriptor_pool.DescriptorPool().AddSerializedFile' proto/kserve/grpc_service_pb2.py
