#!/usr/bin/env python3
"""Holds a listening TCP socket and runs a program on it the way systemd
socket activation does (sd_listen_fds(3): the socket as fd 3, LISTEN_FDS=1,
LISTEN_PID set to the program's pid), so that the program can be stopped
and started again while the socket stays open, as `systemctl restart` of a
socket-activated service does. Used by tests/it/upgrade.rs.

Usage: socket_activate.py PORT -- COMMAND [ARGS...]

Binds 127.0.0.1:PORT (0: any free port) and prints "listening PORT". Then
reads one command per line on stdin:
  start   starts COMMAND on the socket; prints "started PID"
  stop    sends SIGTERM and waits for it to exit; prints "stopped STATUS"
At the end of stdin the program is stopped and the socket closed.
"""

import os
import signal
import socket
import subprocess
import sys

port = int(sys.argv[1])
command = sys.argv[sys.argv.index("--") + 1:]

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen(1024)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
print("listening", sock.getsockname()[1], flush=True)

env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="http")
child = None


def stop():
    global child
    if child is None:
        return None
    child.send_signal(signal.SIGTERM)
    status = child.wait()
    child = None
    return status


for line in sys.stdin:
    word = line.strip()
    if word == "start" and child is None:
        # LISTEN_PID must be the program's own pid: set it in a shell that
        # then becomes the program.
        child = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *command],
            env=env,
            pass_fds=(3,),
            stdin=subprocess.DEVNULL,
        )
        print("started", child.pid, flush=True)
    elif word == "stop":
        print("stopped", stop(), flush=True)
    else:
        print("unknown command", word, flush=True)
stop()
