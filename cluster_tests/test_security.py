"""Node authentication, caller credentials and hostile input, against real daemons."""

import os
import socket
import struct

import msgpack
import pytest
import zmq

from kerrighed import localcluster
from kerrighed import protocol as p
from kerrighed.cli import krgadm
from kerrighed.client import Client
from kerrighed.errors import PermissionDenied

from conftest import NOBODY, run_as, wait_for

def test_a_daemon_with_a_key_not_in_the_configuration_is_refused(cluster, make_home):
    localcluster.stop_daemon(cluster.home, 3)
    wait_for(lambda: cluster.states(1)[3] == "possible", what="node 3 gone")
    # The rogue claims to be node 3 with a key of its own, in a configuration of its own.
    rogue = make_home("krg-rogue-")
    cfg = cluster.home.load_config()
    (rogue.path / "keys").mkdir(mode=0o700)
    forged = rogue.make_keypair(3).decode()
    nodes = {n: (c if n != 3 else type(c)(c.id, c.address, c.port, forged)) for n, c in cfg.nodes.items()}
    type(cfg)(session=cfg.session, nodes=nodes).save(rogue.cluster_file)
    localcluster.start_daemons(rogue, [3])
    try:
        wait_for(lambda: f"CURVE key {forged} is not a node of this cluster" in cluster.log(1),
                 what="node 1 to log the refusal")
        assert "refused a connection from 127.0.0.13" in cluster.log(1)
        assert cluster.states(1)[3] == "possible"
        assert cluster.states(2)[3] == "possible"
        with Client(rogue.socket(3)) as c:     # and the rogue hears nothing from the cluster
            assert {n["id"]: n["state"] for n in c.call(p.NodesStatus())["nodes"]} == {
                1: "possible", 2: "possible", 3: "present"}
    finally:
        localcluster.stop_daemon(rogue, 3)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_an_unprivileged_user_cannot_change_the_cluster(cluster):
    home = str(cluster.home.path)

    def as_nobody():
        # The real command's entry point, run by uid 65534 (the venv's interpreter lives under
        # /root here, which nobody may not execute, so we fork instead of exec).
        read_ok = krgadm.main(["--home", home, "nodes", "status"]) == 0
        refused = krgadm.main(["--home", home, "nodes", "del", "-n", "3"])
        with Client(cluster.home.socket(1)) as c:     # the daemon's own check, without the command's
            for msg in (p.NodesDel(nodes=[3]), p.ClusterPoweroff()):
                try:
                    c.call(msg)
                    return 3
                except PermissionDenied as e:
                    print(e)
        return 0 if read_ok and refused == 1 else 4

    status, out = run_as(NOBODY, as_nobody)
    assert status == 0, out
    assert b"1:online\n2:online\n3:online\n" in out
    assert b"krgadm: nodes del: permission denied (only root may change the cluster)\n" in out
    assert b"nodes.del: permission denied" in out and b"cluster.poweroff: permission denied" in out
    assert "refused nodes.del to uid 65534" in cluster.log(1)
    assert "refused cluster.poweroff to uid 65534" in cluster.log(1)
    assert cluster.online(1) == {1, 2, 3}


def _raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def _read_reply(s) -> p.Message:
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        try:
            count = struct.unpack(">I", buf[:4])[0]
            frames, off = [], 4
            for _ in range(count):
                size = struct.unpack(">I", buf[off:off + 4])[0]
                if len(buf) < off + 4 + size:
                    raise struct.error
                frames.append(buf[off + 4: off + 4 + size])
                off += 4 + size
            return p.decode(frames)[0]
        except struct.error:
            continue
    raise AssertionError("connection closed without a reply")


def _frames(version=p.VERSION, op=b"nodes.status", body=None):
    return [bytes([version]), op, (5).to_bytes(8, "big"), msgpack.packb({} if body is None else body)]


@pytest.mark.parametrize("data, reason", [
    (p.pack_stream(_frames(version=7)), "unsupported protocol version 7"),
    (p.pack_stream(_frames(op=b"no.such")), "unknown op"),
    (p.pack_stream(_frames(op=b"nodes.add", body={"nodes": "all"})), "wrong type"),
    (p.pack_stream(_frames()[:2]), "truncated"),
    (p.pack_stream([_frames()[0], _frames()[1], _frames()[2], b"\xc1"]), "not valid msgpack"),
    (struct.pack(">II", 1, p.MAX_FRAME + 1), "exceeds"),
    (struct.pack(">I", 1000), "frames in a message"),
])
def test_malformed_local_messages_get_an_error_reply(cluster, data, reason):
    with _raw(cluster.home.socket(1)) as s:
        s.sendall(data)
        reply = _read_reply(s)
    assert isinstance(reply, p.Error) and reason in reply.message
    assert "refused a message from pid" in cluster.log(1)
    assert cluster.online(1) == {1, 2, 3}          # still serving


def test_a_half_sent_local_message_does_not_hurt(cluster):
    with _raw(cluster.home.socket(1)) as s:
        s.sendall(p.pack_stream(_frames())[:9])    # header and part of a frame, then hang up
    wait_for(lambda: "truncated message" in cluster.log(1), what="the daemon to log the truncation")
    assert cluster.online(1) == {1, 2, 3}


def peer_socket(cluster, me: int, to: int):
    """A DEALER speaking to node `to` as node `me` would, with `me`'s CURVE keys."""
    cfg = cluster.home.load_config()
    public, secret = cluster.home.load_keypair(me)
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    d.curve_serverkey = cfg.node(to).public_key.encode()
    d.curve_publickey, d.curve_secretkey = public, secret
    d.rcvtimeo = 5000
    d.connect(cfg.node(to).endpoint)
    return ctx, d


def test_malformed_peer_messages_get_an_error_reply(cluster):
    """A peer with a valid key (node 3's) sending garbage to node 1's node-to-node socket."""
    ctx, d = peer_socket(cluster, me=3, to=1)
    try:
        def ask(frames):
            d.send_multipart(frames)
            return p.decode(d.recv_multipart())

        rid = (9).to_bytes(8, "big")
        cases = [
            ([b"\x09", b"peer.ping", rid, msgpack.packb({})], "unsupported protocol version 9"),
            ([b"\x01", b"peer.nonsense", rid, msgpack.packb({})], "unknown op"),
            ([b"\x01", b"peer.ping", rid, b"\xc1\xc1"], "not valid msgpack"),
            ([b"\x01", b"peer.ping", rid, msgpack.packb({"sent": "x"})], "wrong type"),
            ([b"\x01", b"peer.ping", rid, msgpack.packb({"sent": 1.0, "pad": b"x" * (2 << 20)})], "exceeds"),
            ([b"\x01", b"nodes.del", rid, msgpack.packb({"nodes": [2]})], "not a node-to-node message"),
        ]
        for frames, reason in cases:
            reply, got_rid, _ = ask(frames)
            assert isinstance(reply, p.Error) and reason in reply.message, (reason, reply)
            assert got_rid == 9
        d.send_multipart([b"\x01", b"peer.ping"])    # truncated: no request id to answer to
        reply, _, _ = ask(p.encode(p.PeerPing(sent=1.0), rid=10))
        assert isinstance(reply, p.Ok) and reply.result == {"node": 1}
    finally:
        ctx.destroy(linger=0)
    assert "refused a message from node 3" in cluster.log(1)
    assert cluster.online(1) == {1, 2, 3}


def test_a_heartbeat_claiming_another_node_is_ignored(cluster):
    ctx, d = peer_socket(cluster, me=3, to=1)
    try:
        fake = p.Heartbeat(node=2, incarnation=1, view={"epoch": 99, "proposer": 3, "members": [[3, 1]]}, stats={})
        d.send_multipart(p.encode(fake))
        wait_for(lambda: "sent a heartbeat claiming to be node 2" in cluster.log(1), what="the forgery to be logged")
    finally:
        ctx.destroy(linger=0)
    assert cluster.call(1, p.ClusterStatus())["epoch"] < 99
    assert cluster.online(1) == {1, 2, 3}
