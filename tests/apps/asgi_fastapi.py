"""A FastAPI app for anteroom-asgi (tests/it/wsgi.rs)."""
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

started = []


@asynccontextmanager
async def lifespan(app):
    started.append(True)
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/hello", response_class=PlainTextResponse)
async def hello(name: str = "world"):
    return f"hello from fastapi, {name}\n"


@app.post("/echo")
async def echo(request: Request):
    body = await request.body()
    return {"framework": "fastapi", "method": request.method, "path": request.url.path,
            "body": body.decode(), "header": request.headers.get("x-test"),
            "lifespan_started": bool(started)}


@app.get("/stream")
async def stream():
    import asyncio

    from fastapi.responses import StreamingResponse

    async def pieces():
        for i in range(2):
            if i:
                await asyncio.sleep(0.6)
            yield f"piece {i}\n"

    return StreamingResponse(pieces(), media_type="text/plain")
