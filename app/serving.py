"""uvicorn's server with a shutdown that ends streaming answers at a part boundary.

uvicorn's graceful shutdown waits for in-flight requests, then cancels them
and runs the lifespan shutdown at once. A streaming WADO-RS answer cancelled
that way is closed while data is still buffered for the client: uvicorn
neither flushes nor aborts the connection, the lifespan tears down the
storage SCP under the retrieve, and with uvloop the event loop cannot even
close (EBUSY) while the socket is open.

So a shutdown first gives in-flight requests ``grace`` seconds to finish,
then sets ``draining``: multipart answers stop after the part they are
sending and end without the closing delimiter (PS3.18 §8.7.3.5: a client
sees the body is incomplete), which uvicorn completes and flushes normally.
Only what is still running ``HARD_STOP`` seconds later is cancelled.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import uvicorn

# Time left to drained answers to flush what the client has not read yet.
HARD_STOP = 5.0


class DrainingServer(uvicorn.Server):
    """``DrainingServer(config, draining, grace).run()``; *draining* is the app's flag."""

    def __init__(self, config: uvicorn.Config, draining: threading.Event, grace: float) -> None:
        config.timeout_graceful_shutdown = grace + HARD_STOP  # type: ignore[assignment]
        super().__init__(config)
        self.draining = draining
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        later = asyncio.get_running_loop().call_later(self.grace, self.draining.set)
        try:
            await super().shutdown(sockets)
        finally:
            later.cancel()
            self.draining.set()
