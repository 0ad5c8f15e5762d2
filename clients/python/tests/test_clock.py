"""The queue's clock (docs/protocol.md, "Time"): Redis's, estimated from
TIME readings, preferring the reading over the shortest round trip."""
import time

from anteroom.protocol import Clock


def test_follows_the_server_and_prefers_short_round_trips():
    clock = Clock()
    wall = time.time() * 1000
    assert abs(clock.now_ms() - wall) < 1000, "before any reading it is the host's clock"

    # The server is an hour ahead; the reading took 2 ms.
    sent = time.monotonic()
    server = wall + 3_600_000
    clock.observe((int(server // 1000), int(server % 1000 * 1000)), sent, sent + 0.002)
    assert abs(clock.now_ms() - time.time() * 1000 - 3_600_000) < 1000

    # A 300 ms round trip that agrees within its error is not taken while
    # the better reading is fresh...
    sent = time.monotonic()
    server = time.time() * 1000 + 3_600_000 + 100
    clock.observe((int(server // 1000), int(server % 1000 * 1000)), sent, sent + 0.3)
    assert 3_599_500 <= clock.now_ms() - time.time() * 1000 <= 3_600_050
    # ... one that disagrees beyond both errors is: the server's clock moved.
    sent = time.monotonic()
    server = time.time() * 1000
    clock.observe((int(server // 1000), int(server % 1000 * 1000)), sent, sent + 0.3)
    assert abs(clock.now_ms() - time.time() * 1000) < 1000

    # One as good is: the server is now 30 s behind.
    sent = time.monotonic()
    server = time.time() * 1000 - 30_000
    clock.observe((int(server // 1000), int(server % 1000 * 1000)), sent, sent + 0.001)
    assert abs(clock.now_ms() - time.time() * 1000 + 30_000) < 1000

    # It advances with the monotonic clock.
    before = clock.now_ms()
    time.sleep(0.02)
    assert 15 <= clock.now_ms() - before < 500
