"""An order-taking WSGI app that writes to MySQL (MariaDB) through a
stable address, served by `anteroom-wsgi` in the MySQL role-swap test
(tests/it/playbooks.rs). PyMySQL; a connection per request, so a request
after the swap reaches whatever server the address names then.

Environment: ORDERS_DB_PORT (the floating address's port on 127.0.0.1),
ORDERS_DB_USER, ORDERS_DB_PASSWORD, ORDERS_DB_NAME.

- POST /orders: inserts the body as an order's note; 201 with
  `ID SERVER_ID`, the server that took it (`@@server_id`). Any database
  error: 500 with its text, so a write refused by a read-only server is
  seen as a failure, not hidden.
"""

import os

import pymysql


def connect():
    return pymysql.connect(
        host="127.0.0.1",
        port=int(os.environ["ORDERS_DB_PORT"]),
        user=os.environ["ORDERS_DB_USER"],
        password=os.environ["ORDERS_DB_PASSWORD"],
        database=os.environ["ORDERS_DB_NAME"],
        connect_timeout=5,
        read_timeout=10,
        write_timeout=10,
        autocommit=True,
    )


def app(environ, start_response):
    if environ["REQUEST_METHOD"] != "POST" or environ["PATH_INFO"] != "/orders":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    note = environ["wsgi.input"].read(length).decode("utf-8")
    try:
        db = connect()
        try:
            with db.cursor() as cur:
                cur.execute("INSERT INTO orders (note) VALUES (%s)", (note,))
                order_id = cur.lastrowid
                cur.execute("SELECT @@server_id")
                (server_id,) = cur.fetchone()
        finally:
            db.close()
    except pymysql.MySQLError as err:
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [f"database error: {err}\n".encode()]
    start_response("201 Created", [("Content-Type", "text/plain")])
    return [f"{order_id} {server_id}\n".encode()]
