import msgpack
import pytest

from kerrighed import protocol as p
from kerrighed.errors import NodeStateError, ProtocolError


def test_roundtrip_keeps_type_fields_rid_and_payload():
    frames = p.encode(p.NodesAdd(nodes=[2, 3]), rid=7, payload=[b"\x00bulk"])
    msg, rid, payload = p.decode(frames)
    assert msg == p.NodesAdd(nodes=[2, 3])
    assert rid == 7
    assert payload == [b"\x00bulk"]


def test_error_reply_rebuilds_the_same_exception_class():
    frames = p.encode(p.Error.of(NodeStateError("Unable to suppress current node.")), rid=1)
    msg, _, _ = p.decode(frames)
    exc = msg.exception()
    assert type(exc) is NodeStateError
    assert str(exc) == "Unable to suppress current node."


def _frames(op=b"nodes.add", body=None, version=p.VERSION, rid=b"\0" * 7 + b"\1"):
    if body is None:
        body = msgpack.packb({"nodes": [1]})
    return [bytes([version]), op, rid, body]


@pytest.mark.parametrize("frames, reason", [
    (_frames()[:3], "truncated"),
    ([b"", *_frames()[1:]], "malformed version"),
    (_frames(version=9), "unsupported protocol version 9"),
    (_frames(op=b"no.such.op"), "unknown op"),
    (_frames(op=b"\xff\xfe"), "not ASCII"),
    (_frames(rid=b"\1"), "malformed request id"),
    (_frames(body=b"\xc1garbage"), "not valid msgpack"),
    (_frames(body=msgpack.packb([1, 2])), "not a map"),
    (_frames(body=msgpack.packb({"nodes": "2,3"})), "wrong type"),
    (_frames(body=msgpack.packb({"nodes": [True]})), "wrong type"),
    (_frames(body=msgpack.packb({})), "missing field"),
    (_frames(body=msgpack.packb({"nodes": [1], "evil": 1})), "unknown fields"),
    (_frames(body=b"\x91" + b"\x00" * (p.MAX_BODY + 1)), "exceeds"),
])
def test_malformed_messages_are_refused_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        p.decode(frames)


def test_a_message_cannot_be_registered_twice():
    with pytest.raises(ValueError):
        @p.message("nodes.add")
        class Again(p.Message):
            pass


def test_stream_packing_counts_frames_and_lengths():
    packed = p.pack_stream([b"ab", b""])
    assert packed == b"\0\0\0\2" + b"\0\0\0\2ab" + b"\0\0\0\0"
