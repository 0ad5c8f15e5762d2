"""A Flask app for anteroom-wsgi (tests/it/wsgi.rs)."""
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/hello")
def hello():
    return f"hello from flask, {request.args.get('name', 'world')}\n"


@app.post("/echo")
def echo():
    return jsonify(framework="flask", method=request.method, path=request.path,
                   body=request.get_data(as_text=True), header=request.headers.get("X-Test"))


@app.get("/stream")
def stream():
    import time

    def pieces():
        for i in range(2):
            if i:
                time.sleep(0.6)
            yield f"piece {i}\n"

    return app.response_class(pieces(), mimetype="text/plain")
