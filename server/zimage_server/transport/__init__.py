"""gRPC transport: proto <-> domain types, validation, and the one place errors become status codes."""
