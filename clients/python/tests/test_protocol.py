"""Request envelopes of both layouts (docs/protocol.md, "Request envelopes, version 2")."""
import struct

import pytest

from anteroom import protocol

#: The version 2 example of docs/protocol.md, byte for byte.
V2_META = (b'["01a20140-78af-77c4-9604-bc4b35fb5daf","POST","/echo","HTTP/1.1",'
           b'[["host","localhost"],["content-length","2"]],"anteroom:{default}:replies:p1",'
           b'null,1700000000000,1700000030000,0,2]')


def frame(version, kind, meta, body=b""):
    return bytes([version, ord(kind)]) + struct.pack(">I", len(meta)) + meta + body


def test_the_documented_version_2_example_decodes_as_its_version_1_twin():
    assert len(V2_META) == 0xB5
    kind, meta, body = protocol.decode(frame(2, "Q", V2_META, b"hi"))
    request = protocol.Request(meta, body)
    assert kind == "Q"
    assert (request.id, request.method, request.uri, request.version) == (
        "01a20140-78af-77c4-9604-bc4b35fb5daf", "POST", "/echo", "HTTP/1.1")
    assert request.headers == [("host", b"localhost"), ("content-length", b"2")]
    assert request.reply_to == "anteroom:{default}:replies:p1"
    assert request.client_addr is None
    assert (request.enqueued_at_ms, request.deadline_ms) == (1700000000000, 1700000030000)
    assert (request.dedupe, request.stream, request.body) == (False, False, b"hi")


def test_later_elements_and_unknown_flag_bits_are_ignored():
    meta = b'["i","GET","/","HTTP/2",[],"r","127.0.0.1:5",1,2,7,0,"later",{"x":1}]'
    for kind in "QUW":
        _, fields, body = protocol.decode(frame(2, kind, meta))
        request = protocol.Request(fields, body)
        assert (request.dedupe, request.stream, request.client_addr) == (True, True, "127.0.0.1:5")


@pytest.mark.parametrize("meta", [
    b'["i","GET","/","HTTP/1.1",[],"r",null,1,2,0]',
    b'["i","GET","/","HTTP/1.1",[],"r",null,1,2,true,0]',
    b'["i","GET","/","HTTP/1.1",[],"r",null,1,2,-1,0]',
    b'["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,3]',
    b'["i","GET","/","HTTP/1.1",[],"r",5,1,2,0,0]',
    b'["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,null]',
    b'["i","GET","/","HTTP/1.1",[],"r",null,1,2,0,false]',
    b'{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",'
    b'"enqueued_at_ms":1,"deadline_ms":2,"body_len":0}',
])
def test_a_short_or_mistyped_version_2_array_is_refused(meta):
    with pytest.raises(protocol.DecodeError):
        protocol.Request(*protocol.decode(frame(2, "Q", meta))[1:])


def test_only_requests_have_a_version_2():
    with pytest.raises(protocol.DecodeError, match="unsupported envelope version 2"):
        protocol.decode(frame(2, "R", b'{"id":"i","status":200,"headers":[],"body_len":0}'))
    with pytest.raises(protocol.DecodeError, match="unsupported envelope version 3"):
        protocol.decode(frame(3, "Q", V2_META, b"hi"))


V1_META = ('{{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",'
           '"enqueued_at_ms":{e},"deadline_ms":{d},"body_len":{b}}}')
V2_INTEGERS = '["i","GET","/","HTTP/1.1",[],"r",null,{e},{d},{f},{b}]'
MAX = str(2**53 - 1)
OVER = [str(2**53), str(2**64 - 1)]


def test_integers_up_to_2_to_the_53_minus_1_decode_in_both_versions():
    for version, meta in ((1, V1_META.format(e=MAX, d=MAX, b=0)),
                          (2, V2_INTEGERS.format(e=MAX, d=MAX, f=MAX, b=0))):
        request = protocol.Request(*protocol.decode(frame(version, "Q", meta.encode()))[1:])
        assert (request.enqueued_at_ms, request.deadline_ms) == (2**53 - 1, 2**53 - 1)


@pytest.mark.parametrize("version,meta", [
    *[(2, V2_INTEGERS.format(e=o, d=2, f=0, b=0)) for o in OVER],
    *[(2, V2_INTEGERS.format(e=1, d=o, f=0, b=0)) for o in OVER],
    *[(2, V2_INTEGERS.format(e=1, d=2, f=o, b=0)) for o in OVER],
    *[(1, V1_META.format(e=o, d=2, b=0)) for o in OVER],
    *[(1, V1_META.format(e=1, d=o, b=0)) for o in OVER],
    (1, V1_META.format(e=-1, d=2, b=0)),
    (1, V1_META.format(e=1, d=-2, b=0)),
    (2, V2_INTEGERS.format(e=-1, d=2, f=0, b=0)),
    (1, V1_META.format(e="true", d=2, b=0)),
    (1, V1_META.format(e=1, d="true", b=0)),
    (1, V1_META.format(e=1, d=2, b="true")),
    (2, V2_INTEGERS.format(e=1, d=2, f="1.5", b=0)),
    (2, V2_INTEGERS.format(e=1, d=2, f="1.0", b=0)),
    (2, V2_INTEGERS.format(e=1.0, d=2, f=0, b=0)),
    (1, V1_META.format(e=1, d=2, b="1.0")),
    (2, V2_INTEGERS.format(e=1, d=2, f=0, b="1.0")),
])
def test_integers_above_2_to_the_53_minus_1_negative_or_not_integers_are_refused(version, meta):
    """Every dispatcher reads a request's integers as JavaScript's doubles
    can (docs/protocol.md): 0 to 2^53 - 1, no booleans, no fractions."""
    # A body of the length a true or a 1.0 would stand for.
    body = b"x" if meta.endswith(("true}", "1.0}", "1.0]")) else b""
    with pytest.raises(protocol.DecodeError):
        protocol.Request(*protocol.decode(frame(version, "Q", meta.encode(), body))[1:])


@pytest.mark.parametrize("meta", [
    # body_len missing, or null: a request names its body's length.
    '{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",'
    '"enqueued_at_ms":1,"deadline_ms":2}',
    '{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",'
    '"enqueued_at_ms":1,"deadline_ms":2,"body_len":null}',
    # dedupe and stream are booleans, client_addr a string or null.
    '{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",'
    '"enqueued_at_ms":1,"deadline_ms":2,"dedupe":1,"body_len":0}',
    '{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",'
    '"enqueued_at_ms":1,"deadline_ms":2,"stream":"yes","body_len":0}',
    '{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",'
    '"client_addr":5,"enqueued_at_ms":1,"deadline_ms":2,"body_len":0}',
    # Version 1 is an object, not an array.
    '["i","GET","/","HTTP/1.1",[],"r",null,1,2,false,false,0]',
])
def test_a_version_1_request_is_read_as_strictly_as_every_dispatcher_reads_it(meta):
    with pytest.raises(protocol.DecodeError):
        protocol.Request(*protocol.decode(frame(1, "Q", meta.encode()))[1:])


def test_a_version_1_request_with_booleans_and_null_client_addr_is_read():
    meta = ('{"id":"i","method":"GET","uri":"/","version":"HTTP/1.1","headers":[],"reply_to":"r",'
            '"client_addr":null,"enqueued_at_ms":1,"deadline_ms":2,"dedupe":true,"stream":false,"body_len":0}')
    request = protocol.Request(*protocol.decode(frame(1, "Q", meta.encode()))[1:])
    assert (request.dedupe, request.stream, request.client_addr) == (True, False, None)
