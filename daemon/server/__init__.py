"""gRPC servicers, tensor encoding, error mapping and server lifecycle."""
