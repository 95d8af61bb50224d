#!/usr/bin/env python3
"""A Tributary stream consumer in plain boto3, as docs/consumers.md explains.

Reads every shard of a stream from TRIM_HORIZON to its current end (one
worker per shard, here one after the other), applies the change envelopes
to an in-memory table with the documented rules, and prints the rows it
ends with as JSON lines: {"table": ..., "key": {...}, "row": {...}}.

The rules, per shard, in order:
  insert / update / snapshot -> the row under `key` becomes `after`
                                (columns in `unchanged` keep their value)
  delete                     -> the row under `key` is removed
  truncate                   -> the rows of that table this shard wrote go
An event whose source.position is not above the last one applied to its
key is a duplicate (at-least-once delivery) and is skipped.

Usage: consumer.py --stream NAME [--endpoint URL] [--region REGION]
Credentials come from the usual AWS chain (for kinesalite, any will do).
"""

import argparse
import json
import time

import boto3


def shard_ids(kinesis, stream):
    ids, token = [], None
    while True:
        page = (kinesis.list_shards(NextToken=token) if token
                else kinesis.list_shards(StreamName=stream))
        ids += [s["ShardId"] for s in page["Shards"]]
        token = page.get("NextToken")
        if not token:
            return ids


def read_shard(kinesis, stream, shard_id):
    """Yields the envelopes of one shard, in order, up to its current end."""
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    while iterator:
        page = kinesis.get_records(ShardIterator=iterator, Limit=1000)
        for record in page["Records"]:
            yield json.loads(record["Data"])
        if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
            return
        iterator = page.get("NextShardIterator")
        if not page["Records"]:
            time.sleep(0.05)


def table_of(envelope):
    source = envelope["source"]
    return f'{source["schema"] or source["db"]}.{source["table"]}'


def apply(rows, positions, shard, envelope):
    if envelope["op"] in ("begin", "end"):
        return  # a transaction marker (sink.transaction_markers) changes no row
    table = table_of(envelope)
    key = json.dumps(envelope["key"], sort_keys=True)
    op = envelope["op"]
    position = envelope["source"]["position"]
    if op == "truncate":
        for k in [k for k, (s, _) in rows.items() if k[0] == table and s == shard]:
            del rows[k]
        return
    if positions.get((table, key), "") >= position:
        return  # a duplicate of an event already applied
    positions[(table, key)] = position
    if op == "delete":
        rows.pop((table, key), None)
        return
    row = dict(envelope["after"])
    previous = rows.get((table, key), (None, {}))[1]
    for column in envelope.get("unchanged") or []:
        row[column] = previous.get(column)
    rows[(table, key)] = (shard, row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", required=True)
    parser.add_argument("--endpoint")
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args()
    kinesis = boto3.client("kinesis", region_name=args.region, endpoint_url=args.endpoint)
    rows, positions = {}, {}
    for shard in shard_ids(kinesis, args.stream):
        for envelope in read_shard(kinesis, args.stream, shard):
            apply(rows, positions, shard, envelope)
    for (table, key), (_, row) in sorted(rows.items()):
        print(json.dumps({"table": table, "key": json.loads(key), "row": row}))


if __name__ == "__main__":
    main()
