#!/usr/bin/env python3
"""The README's ClickHouse recipe, run with the embedded ClickHouse (chdb) on real amibus output.

Called by tests/consumers.rs with:
  --readme README.md      the SQL blocks between warehouse-sql:begin and warehouse-sql:end
  --proto DIR             proto/ (envelope.proto goes where format_schema finds it)
  --gen DIR               the Python code generated from it (amibus/v1/envelope_pb2.py)
  --events FILE           a file sink's output (length-delimited envelopes)
  --quirks FILE           `amibus decode --format proto` of a recording with a line without a
                          colon and a renamed legacy header
  --messages DIR          single bus messages read back from Kafka, one file each

Every answer ClickHouse gives is compared with what the generated protobuf code decodes from the
same bytes. Exits 1 with what differs.

The Kafka engine itself cannot run here: chdb 4.4 fails creating any Kafka table ("Shutdown was
called"). Its block is checked with formatQuery (it parses), and its kafka_format and
kafka_schema are used to load the single messages read from the broker, which is what the
engine does with each message.
"""

import argparse
import atexit
import os
import re
import shutil
import sys
import tempfile
from collections import Counter, defaultdict

import chdb
from chdb import session

failures = []


def check(what, got, want):
    if got == want:
        print(f"  ok   {what}")
    else:
        failures.append(what)
        print(f"  FAIL {what}:\n       ClickHouse: {repr(got)[:1500]}\n"
              f"       protobuf:   {repr(want)[:1500]}")


def sql_blocks(readme):
    text = open(readme, encoding="utf-8").read()
    m = re.search(r"<!-- warehouse-sql:begin.*?-->(.*?)<!-- warehouse-sql:end -->", text, re.S)
    if not m:
        raise SystemExit("README.md has no warehouse-sql:begin ... warehouse-sql:end section")
    blocks = {}
    for body in re.findall(r"```sql\n(.*?)```", m[1], re.S):
        name = re.match(r"-- name: (\w+)\n", body)
        if not name:
            raise SystemExit(f"a sql block without `-- name:`: {body[:60]!r}")
        blocks[name[1]] = body[name.end():].strip()
    return blocks


def statements(block):
    return [s.strip() for s in block.split(";") if s.strip()]


def read_delimited(path, Envelope):
    out = []
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
        n = shift = 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        env = Envelope()
        env.ParseFromString(data[i:i + n])
        out.append(env)
        i += n
    return out


def rows(s, query):
    text = str(s.query(query, "TabSeparated"))
    return [tuple(line.split("\t")) for line in text.splitlines()]


def ident(e):
    return (e.server, e.epoch, e.seq)


def at_us(e):
    return e.asterisk_time_us if e.HasField("asterisk_time_us") else e.received_at_ns // 1000


def main():
    p = argparse.ArgumentParser()
    for a in ("readme", "proto", "gen", "events", "quirks", "messages"):
        p.add_argument(f"--{a}", required=True)
    args = p.parse_args()
    sys.path.insert(0, args.gen)
    from amibus.v1 import envelope_pb2 as pb

    blocks = sql_blocks(args.readme)
    want = {"table", "load_file", "kafka", "events_per_name", "calls", "call_duration",
            "hangup_causes"}
    if set(blocks) != want:
        raise SystemExit(f"README sql blocks: {sorted(blocks)}, expected {sorted(want)}")

    work = tempfile.mkdtemp(prefix="amibus-warehouse-")
    atexit.register(shutil.rmtree, work, True)
    shutil.copy(os.path.join(args.proto, "amibus", "v1", "envelope.proto"), work)
    shutil.copy(args.events, os.path.join(work, "events.bin"))
    os.chdir(work)  # chdb resolves file() paths and format_schema against it
    print(f"== chdb {chdb.__version__}: the README's SQL on {args.events}")
    s = session.Session()
    s.query(blocks["table"])
    s.query(blocks["load_file"])
    envs = read_delimited("events.bin", pb.Envelope)
    check("records loaded", rows(s, "SELECT count() FROM ami_events"), [(str(len(envs)),)])
    check("(server, epoch, seq) of every record",
          rows(s, "SELECT server, epoch, seq FROM ami_events ORDER BY server, epoch, seq"),
          [(e.server, str(e.epoch), str(e.seq)) for e in sorted(envs, key=ident)])
    check("every header, in wire order",
          rows(s, "SELECT server, seq, arrayStringConcat(headers.key, '|'), "
                  "arrayStringConcat(arrayMap(v -> ifNull(v, '<null>'), headers.value), '|') "
                  "FROM ami_events ORDER BY server, epoch, seq"),
          [(e.server, str(e.seq), "|".join(h.key.decode() for h in e.headers),
            "|".join(h.value.decode() if h.HasField("value") else "<null>" for h in e.headers))
           for e in sorted(envs, key=ident)])

    events = [e for e in envs if e.kind == pb.KIND_EVENT]
    per_name = Counter(e.name for e in events)
    check("events_per_name", rows(s, blocks["events_per_name"]),
          [(n, str(c)) for n, c in sorted(per_name.items(), key=lambda x: (-x[1], x[0]))])

    calls = defaultdict(list)
    for e in envs:
        if e.linkedid:
            calls[(e.server, e.linkedid)].append(e)
    if len(calls) < 2 or max(len(v) for v in calls.values()) < 2:
        failures.append("calls")
        print(f"  FAIL the input has too few calls to prove anything ({len(calls)})")
    check("calls", rows(s, blocks["calls"]),
          [(k[0], k[1], str(len(v)), str(len({e.channel for e in v})))
           for k, v in sorted(calls.items(), key=lambda x: (-len(x[1]), x[0]))])
    durations = {k: (max(map(at_us, v)) - min(map(at_us, v))) / 1e6 for k, v in calls.items()}
    got = rows(s, blocks["call_duration"])
    check("call_duration",
          [(a, b, round(float(c), 6)) for a, b, c in got],
          [(k[0], k[1], round(d, 6))
           for k, d in sorted(durations.items(), key=lambda x: (-x[1], x[0]))])
    causes = Counter()
    for e in envs:
        if e.name == "Hangup":
            causes[next((h.value.decode() for h in e.headers if h.key == b"Cause"), "")] += 1
    check("hangup_causes", rows(s, blocks["hangup_causes"]),
          [(c, str(n)) for c, n in sorted(causes.items())])
    if not causes:
        failures.append("hangup_causes")
        print("  FAIL no Hangup in the input")

    print(f"== a line without a colon and a renamed legacy header ({args.quirks})")
    shutil.copy(args.quirks, os.path.join(work, "quirks.bin"))
    s.query("TRUNCATE TABLE ami_events")
    s.query(blocks["load_file"].replace("'events.bin'", "'quirks.bin'"))
    check("a header without a value is NULL",
          rows(s, "SELECT k FROM ami_events ARRAY JOIN headers.key AS k, headers.value AS v "
                  "WHERE v IS NULL AND kind = 'KIND_EVENT'"),
          [("A line without a colon",)])
    check("a renamed legacy header keeps its normalized_key",
          rows(s, "SELECT k, v, n FROM ami_events ARRAY JOIN headers.key AS k, "
                  "headers.value AS v, headers.normalized_key AS n WHERE n != '' ORDER BY k"),
          [("Destination", "SIP/2-0002", "DestChannel"), ("UniqueID", "1.1", "Uniqueid")])
    check("the legacy name is mapped",
          rows(s, "SELECT name, original_name FROM ami_events WHERE original_name != ''"),
          [("DialBegin", "Dial")])

    print(f"== single bus messages read back from Kafka ({args.messages})")
    kafka = blocks["kafka"]
    for stmt in statements(kafka):
        s.query(f"SELECT formatQuery({quote(stmt)})")
    print("  ok   the kafka block parses (formatQuery)")
    fmt = re.search(r"kafka_format\s*=\s*'(\w+)'", kafka)[1]
    schema = re.search(r"kafka_schema\s*=\s*'([^']+)'", kafka)[1]
    msgs = sorted(os.listdir(args.messages))
    shutil.copytree(args.messages, os.path.join(work, "messages"))
    from_bus = []
    for m in msgs:
        env = pb.Envelope()
        env.ParseFromString(open(os.path.join(args.messages, m), "rb").read())
        from_bus.append(env)
    s.query("TRUNCATE TABLE ami_events")
    s.query(f"INSERT INTO ami_events SELECT * FROM file('messages/*.bin', '{fmt}') "
            f"SETTINGS format_schema = '{schema}'")
    check(f"every message loads as one record with kafka_format = '{fmt}'",
          rows(s, "SELECT server, epoch, seq, name FROM ami_events "
                  "ORDER BY server, epoch, seq"),
          [(e.server, str(e.epoch), str(e.seq), e.name) for e in sorted(from_bus, key=ident)])
    try:
        s.query(f"SELECT count() FROM file('messages/*.bin', 'Protobuf', 'server String') "
                f"SETTINGS format_schema = '{schema}'")
        failures.append("Protobuf on bus messages")
        print("  FAIL kafka_format = 'Protobuf' read an unframed message without an error")
    except Exception as e:  # noqa: BLE001 - any ClickHouse error is the expected outcome
        print(f"  ok   kafka_format = 'Protobuf' fails on a bus message ({str(e)[:80]}...)")

    if failures:
        print(f"warehouse: {len(failures)} problem(s): {failures}")
        sys.exit(1)
    print("warehouse: all checks passed")


def quote(stmt):
    return "'" + stmt.replace("\\", "\\\\").replace("'", "\\'") + "'"


if __name__ == "__main__":
    main()
