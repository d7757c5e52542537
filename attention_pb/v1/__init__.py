"""``attention.v1``: messages (``attention_pb2``) and service stubs (``attention_pb2_grpc``), generated."""
