"""The commands' start: a missing or wrong app, a bad duration and an
unreachable Redis are one-line errors with an exit status, not tracebacks."""
import socket
import subprocess
import sys


def run(*args, env=None, cwd=None):
    code = "import sys; from anteroom.cli import asgi_main, wsgi_main; " \
           "(asgi_main if sys.argv[1] == 'asgi' else wsgi_main)(sys.argv[2:])"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)
    return done.returncode, done.stderr


def test_a_wrong_app_is_a_one_line_usage_error(tmp_path):
    (tmp_path / "m.py").write_text("value = 3\n")
    for target, said in [("nosuchmod:app", "cannot import 'nosuchmod'"), ("m:nosuch", "'m' has no 'nosuch'"),
                         ("m", "is not MODULE:APP"), ("m:value", "is not an ASGI app")]:
        status, err = run("asgi", target, cwd=tmp_path)
        assert status == 2, (target, err)
        assert said in err and "Traceback" not in err, (target, err)
        assert err.startswith("anteroom-asgi: "), err


def test_a_bad_duration_from_the_environment_is_a_usage_error(tmp_path):
    import os
    status, err = run("wsgi", "m:app", env=dict(os.environ, ANTEROOM_GRACE="abc"), cwd=tmp_path)
    assert status == 2 and "not a duration: 'abc'" in err and "Traceback" not in err, err


def test_an_unreachable_redis_is_one_line_and_status_1(tmp_path):
    (tmp_path / "m.py").write_text("async def app(scope, receive, send):\n    pass\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, err = run("asgi", "--redis", f"redis://127.0.0.1:{port}", "m:app", cwd=tmp_path)
    assert status == 1, err
    assert f"anteroom-asgi: Redis at redis://127.0.0.1:{port}:" in err and "Traceback" not in err, err
