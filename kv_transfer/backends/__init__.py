"""Transport backends, imported by name through kv_transfer.transport.load_backend."""
