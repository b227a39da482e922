#!/usr/bin/env python3
"""An amibus consumer in Python: reads envelopes from a file sink's output, NATS or Kafka.

Generate the protobuf code from the contract first (protobuf >= 5 at run time):

    pip install grpcio-tools protobuf
    python3 -m grpc_tools.protoc -I proto --python_out=examples/python/gen \
        proto/amibus/v1/envelope.proto

then (with examples/python/gen on PYTHONPATH, or --gen DIR):

    amibus_consumer.py file events.bin                # length-delimited ([pipeline] format = "proto")
    amibus_consumer.py nats nats://127.0.0.1:4222 'ami.>'      # needs `pip install nats-py`
    amibus_consumer.py kafka 127.0.0.1:9092 ami.events         # needs `pip install confluent-kafka`

With `--state FILE`, it also keeps what a wallboard keeps, per server: the channels up, the
bridges and the device states, from live events and from amibus's state snapshots, and
writes it to FILE as JSON at the end (see "Rebuilding state" below).

Prints one JSON object per envelope on standard output (the proto3 JSON mapping: 64-bit
integers as strings, bytes as base64), and at the end, on standard error, one line:
`amibus_consumer: N envelopes, K kinds, H holes` followed by the holes it saw: for every
(server, epoch), the seqs that never arrived. A `gap` record names records amibus had to drop;
a hole no gap names is a record lost on the way (or not read yet).

What a consumer must know (proto/amibus/v1/envelope.proto):
- a bus message (NATS, Kafka) is one Envelope, unframed; a file holds varint-length-delimited
  Envelopes (the framing of protobuf's parseDelimitedFrom / writeDelimitedTo);
- (server, epoch, seq) identifies a record: deliveries are at-least-once, so drop duplicates
  on it, and sort by seq when order matters;
- header values are bytes (Asterisk sends whatever encoding the PBX has); `value` is absent
  for a line without a colon (HasField("value") is False).

Rebuilding state (README "Rebuilding state: snapshots"): after every login and every gap,
amibus publishes `snapshot_begin`, the server's lists as ordinary events carrying
`snapshot_id` (CoreShowChannel, BridgeListItem, DeviceStateChange, ...), and `snapshot_end`.
At `snapshot_begin`, forget what you hold for that server; apply the items as facts and the
live events as usual, before, during and after the snapshot. A consumer that starts reading
mid-stream, or lost records, is right again from the next snapshot on.
"""

import argparse
import json
import sys
from collections import defaultdict


def read_varint(f):
    """A protobuf base-128 varint from a binary file; None at a clean end of file."""
    shift = 0
    result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift == 0:
                return None
            raise EOFError("the file ends inside a length prefix")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("a length prefix longer than 10 bytes: not a delimited stream")


def read_delimited(path, Envelope):
    """Every Envelope of a length-delimited file, in order."""
    with open(path, "rb") as f:
        while True:
            n = read_varint(f)
            if n is None:
                return
            data = f.read(n)
            if len(data) != n:
                raise EOFError(f"the file ends inside a record ({len(data)} of {n} bytes)")
            env = Envelope()
            env.ParseFromString(data)
            yield env


def read_nats(url, subject, Envelope):
    """Envelopes published on a core NATS subject from now on, until Ctrl-C."""
    import asyncio

    import nats  # pip install nats-py

    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(url))
    sub = loop.run_until_complete(nc.subscribe(subject))
    try:
        while True:
            try:
                msg = loop.run_until_complete(sub.next_msg(timeout=60))
            except nats.errors.TimeoutError:
                continue
            env = Envelope()
            env.ParseFromString(msg.data)
            yield env
    except KeyboardInterrupt:
        return
    finally:
        loop.run_until_complete(nc.close())


def read_kafka(brokers, topic, Envelope):
    """Envelopes of a Kafka topic from the earliest offset, until 10 s pass without one."""
    from confluent_kafka import Consumer  # pip install confluent-kafka

    c = Consumer({"bootstrap.servers": brokers, "group.id": "amibus-python-example",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    try:
        while True:
            msg = c.poll(10.0)
            if msg is None:
                return
            if msg.error():
                raise RuntimeError(msg.error())
            env = Envelope()
            env.ParseFromString(msg.value())
            yield env
    finally:
        c.close()


class Ledger:
    """Which (server, epoch, seq) arrived, and which gaps amibus announced."""

    def __init__(self):
        self.seqs = defaultdict(set)
        self.kinds = defaultdict(int)
        self.count = 0

    def add(self, env, kind_name):
        self.count += 1
        self.kinds[kind_name] += 1
        if env.seq:  # seq 0: a connection_down written for a run that was killed
            self.seqs[(env.server, env.epoch)].add(env.seq)

    def holes(self):
        out = {}
        for key, seqs in sorted(self.seqs.items()):
            missing = sorted(set(range(1, max(seqs) + 1)) - seqs)
            if missing:
                out[f"{key[0]}/{key[1]}"] = missing
        return out


class State:
    """Per server: channels up, bridges, device states; see "Rebuilding state" above."""

    def __init__(self):
        self.servers = defaultdict(lambda: {"channels": set(), "bridges": set(), "devices": {}})

    def apply(self, env, kind_name):
        s = self.servers[env.server]
        if kind_name == "KIND_SNAPSHOT_BEGIN":
            s["channels"].clear()
            s["bridges"].clear()
            s["devices"].clear()
            return
        if kind_name != "KIND_EVENT":
            return

        def header(key):
            for h in env.headers:
                if h.key == key.encode():
                    return h.value.decode("utf-8", "replace")
            return ""

        name = env.name
        if name in ("Newchannel", "CoreShowChannel"):
            s["channels"].add(env.channel)
        elif name == "Hangup":
            s["channels"].discard(env.channel)
        elif name in ("BridgeCreate", "BridgeListItem"):
            s["bridges"].add(header("BridgeUniqueid"))
        elif name == "BridgeDestroy":
            s["bridges"].discard(header("BridgeUniqueid"))
        elif name == "DeviceStateChange":
            s["devices"][header("Device")] = header("State")

    def to_json(self):
        return {
            server: {"channels": sorted(s["channels"]), "bridges": sorted(s["bridges"]),
                     "devices": dict(sorted(s["devices"].items()))}
            for server, s in sorted(self.servers.items())
        }


def print_envelope(env):
    from google.protobuf import json_format

    d = json_format.MessageToDict(env, preserving_proto_field_name=True)
    sys.stdout.write(json.dumps(d, separators=(",", ":")) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gen", help="directory with the generated amibus/v1/envelope_pb2.py")
    p.add_argument("--state", help="write the state rebuilt from events and snapshots here (JSON)")
    sub = p.add_subparsers(dest="source", required=True)
    f = sub.add_parser("file", help="a length-delimited file (file sink, amibus decode)")
    f.add_argument("path")
    n = sub.add_parser("nats", help="a core NATS subject")
    n.add_argument("url")
    n.add_argument("subject", nargs="?", default="ami.>")
    k = sub.add_parser("kafka", help="a Kafka topic, from the earliest offset")
    k.add_argument("brokers")
    k.add_argument("topic", nargs="?", default="ami.events")
    args = p.parse_args()
    if args.gen:
        sys.path.insert(0, args.gen)
    from amibus.v1 import envelope_pb2

    Envelope = envelope_pb2.Envelope
    if args.source == "file":
        envelopes = read_delimited(args.path, Envelope)
    elif args.source == "nats":
        envelopes = read_nats(args.url, args.subject, Envelope)
    else:
        envelopes = read_kafka(args.brokers, args.topic, Envelope)

    ledger = Ledger()
    state = State()
    try:
        for env in envelopes:
            kind_name = envelope_pb2.Kind.Name(env.kind)
            ledger.add(env, kind_name)
            state.apply(env, kind_name)
            print_envelope(env)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`
        sys.stdout = None
    if args.state:
        with open(args.state, "w") as f:
            json.dump(state.to_json(), f, indent=1)
    holes = ledger.holes()
    print(f"amibus_consumer: {ledger.count} envelopes, {len(ledger.kinds)} kinds, "
          f"{sum(len(v) for v in holes.values())} holes {json.dumps(holes)}", file=sys.stderr)


if __name__ == "__main__":
    main()
