"""Real HTTP clients for the proxy tests, driven from the command line.

    clients.py upload URL SIZE [--chunked] [--header NAME:VALUE]...
        POSTs SIZE bytes with Python's http.client, which writes the whole
        body before it reads the answer (as Node's fetch and browsers do).
        --chunked sends it chunked instead of with a Content-Length.
    clients.py h2-upload URL SIZE
        The same over HTTP/2 (h2c with prior knowledge) with httpx.
    clients.py h2-stall URL 0
        Opens an HTTP/2 connection with a flow-control window of 0, asks
        for URL and never reads the answer (never sends WINDOW_UPDATE);
        prints {"closed_after": SECONDS} once the server closes it, or
        {"error": ...} if it is still open after 30 s.
    clients.py h2-idle-pings URL 0
        Asks for URL over HTTP/2, reads the answer, then stays idle but for
        a PING every 200 ms (as an HTTP/2 library answering the server's
        PINGs keeps bytes moving); prints {"closed_after": SECONDS} once
        the server closes the connection, or {"error": ...} after 30 s.
    clients.py h2-resets URL N
        On one HTTP/2 connection, opens N GET streams ten at a time and
        resets each batch (RST_STREAM CANCEL) 50 ms after opening it;
        prints {"opened": K, "goaway": true|false} once the server sends
        GOAWAY or all N are done.

Prints one JSON object: {"status", "version", "connection", "retry_after",
"body"}, or {"error": "..."} when no response could be read.
"""

import http.client
import json
import sys
import urllib.parse


def upload(url, size, chunked, headers):
    target = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    path = target.path or "/"
    if chunked:
        def chunks():
            left = size
            while left > 0:
                n = min(left, 65536)
                left -= n
                yield b"u" * n
        conn.request("POST", path, body=chunks(), headers=headers, encode_chunked=True)
    else:
        conn.request("POST", path, body=b"u" * size, headers=headers)
    resp = conn.getresponse()
    return {
        "status": resp.status,
        "version": "HTTP/1.1" if resp.version == 11 else "HTTP/1.0",
        "connection": resp.getheader("connection"),
        "retry_after": resp.getheader("retry-after"),
        "body": resp.read().decode("utf-8", "replace"),
    }


def h2_upload(url, size):
    import httpx

    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        resp = client.post(url, content=b"u" * size)
        return {
            "status": resp.status_code,
            "version": resp.http_version,
            "connection": resp.headers.get("connection"),
            "retry_after": resp.headers.get("retry-after"),
            "body": resp.text,
        }


def h2_stall(url):
    import socket
    import time
    import urllib.parse

    import h2.config
    import h2.connection
    import h2.settings

    target = urllib.parse.urlsplit(url)
    sock = socket.create_connection((target.hostname, target.port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    conn.send_headers(1, [
        (":method", "GET"), (":path", target.path or "/"),
        (":scheme", "http"), (":authority", target.netloc),
    ], end_stream=True)
    sock.sendall(conn.data_to_send())
    started = time.monotonic()
    sock.settimeout(30)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            # Answer PINGs and SETTINGS, but never open the window.
            try:
                conn.receive_data(data)
            except Exception:
                pass
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
    except socket.timeout:
        return {"error": "still open after 30 s"}
    except ConnectionResetError:
        pass
    return {"closed_after": round(time.monotonic() - started, 2)}


def h2_idle_pings(url):
    import socket
    import time
    import urllib.parse

    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    target = urllib.parse.urlsplit(url)
    sock = socket.create_connection((target.hostname, target.port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [
        (":method", "GET"), (":path", target.path or "/"),
        (":scheme", "http"), (":authority", target.netloc),
    ], end_stream=True)
    sock.sendall(conn.data_to_send())
    sock.settimeout(0.2)
    answered = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
            if not data:
                break
            events = conn.receive_data(data)
            if any(isinstance(e, h2.events.StreamEnded) for e in events):
                answered = time.monotonic()
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                break  # GOAWAY: the server is closing it
        except socket.timeout:
            pass
        except (ConnectionResetError, BrokenPipeError):
            break
        except h2.exceptions.ProtocolError:
            break  # frames after the server's GOAWAY: it is closing
        if answered is not None:
            conn.ping(b"12345678")
        try:
            sock.sendall(conn.data_to_send())
        except OSError:
            break
    else:
        return {"error": "still open after 30 s"}
    if answered is None:
        return {"error": "no answer"}
    return {"closed_after": round(time.monotonic() - answered, 2)}


def h2_resets(url, n):
    import socket
    import time
    import urllib.parse

    import h2.config
    import h2.connection
    import h2.events

    target = urllib.parse.urlsplit(url)
    sock = socket.create_connection((target.hostname, target.port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sock.setblocking(False)
    opened, goaway = 0, False

    def pump():
        nonlocal goaway
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    goaway = True
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        goaway = True
        except (BlockingIOError, InterruptedError):
            pass
        except Exception:
            goaway = True

    while opened < n and not goaway:
        batch = []
        for _ in range(min(10, n - opened)):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [
                (":method", "GET"), (":path", target.path or "/"),
                (":scheme", "http"), (":authority", target.netloc),
            ], end_stream=True)
            batch.append(sid)
            opened += 1
        sock.sendall(conn.data_to_send())
        time.sleep(0.05)
        pump()
        if goaway:
            break
        for sid in batch:
            try:
                conn.reset_stream(sid, error_code=8)
            except Exception:
                pass
        try:
            sock.sendall(conn.data_to_send())
        except OSError:
            goaway = True
    time.sleep(0.2)
    pump()
    return {"opened": opened, "goaway": goaway}


def main(argv):
    command, url, size = argv[0], argv[1], int(argv[2])
    rest = argv[3:]
    try:
        if command == "upload":
            headers = {}
            for i, arg in enumerate(rest):
                if arg == "--header":
                    name, _, value = rest[i + 1].partition(":")
                    headers[name] = value
            result = upload(url, size, "--chunked" in rest, headers)
        elif command == "h2-upload":
            result = h2_upload(url, size)
        elif command == "h2-stall":
            result = h2_stall(url)
        elif command == "h2-idle-pings":
            result = h2_idle_pings(url)
        elif command == "h2-resets":
            result = h2_resets(url, size)
        else:
            raise SystemExit(f"unknown command {command}")
    except (OSError, http.client.HTTPException, ImportError) as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    except Exception as err:  # httpx's and h2's own errors
        result = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
