#!/usr/bin/env sh
# Regenerate the checked-in gRPC stubs of protos/swarm.proto (needs grpcio-tools==1.81.1,
# whose code runs on protobuf 6). Run from anywhere; writes next to the .proto.
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos protos/swarm.proto
# The generated stub imports "swarm_pb2" as a top-level module; make it package-relative.
sed -i 's/^import swarm_pb2 as swarm__pb2$/from . import swarm_pb2 as swarm__pb2/' protos/swarm_pb2_grpc.py
