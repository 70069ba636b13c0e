"""Contracts that cross a process or actor boundary: frozen dataclasses, schemas, .proto files."""
