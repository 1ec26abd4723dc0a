"""The gRPC sampling service (package diffjax.v1): server, continuous-batching engine, client.

`diffjax serve --workdir DIR` runs the server; `diffjax.serving.Client` and `diffjax client` talk to it.
"""

from diffjax.serving.client import Client

__all__ = ["Client"]
