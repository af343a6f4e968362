"""A cap on HTTP request bodies, counted as the bytes arrive.

Content-Length alone is not enough: a chunked body has none, and the app would read it whole into memory.
Here the body is read up to the cap before the app sees it (so an over-long one never reaches the JSON
parser), then handed on; later reads pass through, so the app still sees a client disconnect."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_FACTOR = 4  # past this many times the cap, the rest of a body is left unread (the connection closes)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_long = declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size, more = 0, True
        while more and not too_long:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_long = size > self.max_bytes
        if too_long:
            # Drained, never held, so the client gets to read the answer; an endless body only so far.
            while more and size <= DRAIN_FACTOR * self.max_bytes:
                message = await receive()
                size += len(message.get("body", b""))
                more = message["type"] == "http.request" and message.get("more_body", False)
            await self._refuse(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": {"message": f"the request body is over {self.max_bytes} bytes",
                                     "type": "invalid_request_error", "param": None, "code": None}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
