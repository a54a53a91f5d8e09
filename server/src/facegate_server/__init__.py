"""FaceGate server: gRPC face identification for gym turnstiles."""
