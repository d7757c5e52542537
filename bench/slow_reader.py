"""A client that reads its answers slowly, and a model that keeps it reading: what the connection age's and the
drain's tests and ``bench/connection_age.py`` put a server through."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path


def ban_end_of_sentence(model: Path) -> None:
    """Rewrites the exported model in the version directory ``model`` so that end-of-sentence is never chosen:
    every search runs to its full length budget, and calls stay in flight long enough to be caught by a SIGTERM or a
    connection's age, whatever the machine's speed."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from server.artifacts import Manifest

    manifest = Manifest.load(model)
    path = model / manifest.decoder_step.file
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    name = manifest.decoder.log_probs_output
    for node in graph.node:
        node.output[:] = [f"{name}_unbiased" if o == name else o for o in node.output]
    bias = np.zeros(manifest.vocab_size, dtype=np.float32)
    bias[manifest.special_ids["eos"]] = -1e4
    graph.initializer.append(numpy_helper.from_array(bias, "eos_bias"))
    graph.node.append(helper.make_node("Add", [f"{name}_unbiased", "eos_bias"], [name]))
    onnx.save(graph_model, str(path))


class SlowReader:
    """A TCP relay that plays a client reading its answers slowly (a busy host, a thin link): what it sends reaches
    the server at once, what the server sends it reads in 8 KiB pieces, a pause between them, through a small
    receive buffer, so that an answer waits in the server's send queue. Each connection made to ``target`` gets a
    connection of its own to the server."""

    def __init__(self, port: int, pause: float = 0.005, receive_buffer: int = 16384) -> None:
        self.upstream_port, self.pause, self.receive_buffer = port, pause, receive_buffer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections = 0  # connections relayed
        self.resets = 0  # of those, connections the server reset
        threading.Thread(target=self._accept, name="slow-reader", daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            self.connections += 1
            threading.Thread(target=self._relay, args=(client,), name="slow-reader-down", daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)  # before connect: the window
        server.connect(("127.0.0.1", self.upstream_port))

        def to_server() -> None:
            try:
                while data := client.recv(65536):
                    server.sendall(data)
            except OSError:
                pass

        threading.Thread(target=to_server, name="slow-reader-up", daemon=True).start()
        try:
            while data := server.recv(8192):
                client.sendall(data)
                time.sleep(self.pause)
        except ConnectionResetError:
            self.resets += 1
        except OSError:
            pass
        for end in (client, server):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
