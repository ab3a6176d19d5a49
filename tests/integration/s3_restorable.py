"""moto's S3 server that comes back with its data: ``python s3_restorable.py PORT SNAPSHOT_DIR``.

moto keeps buckets in memory, so a stopped moto server restarts empty. To stop an S3 endpoint and
bring it back (the outage test), this serves moto (its real HTTP server) on ``PORT`` after loading
``SNAPSHOT_DIR/<bucket>/<key>`` files into it: they are uploaded through a second moto server on
a spare port in the same process (moto's backends are per process), and only then is ``PORT``
opened, so no client ever sees the endpoint up but empty.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import boto3
from moto.moto_server.threaded_moto_server import ThreadedMotoServer


def serve(port: int, snapshot: Path) -> None:
    loader = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    loader.start()
    host, spare = loader.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{spare}", region_name="us-east-1")
    for bucket in sorted(p for p in snapshot.iterdir() if p.is_dir()):
        client.create_bucket(Bucket=bucket.name)
        for f in sorted(p for p in bucket.rglob("*") if p.is_file()):
            client.put_object(Bucket=bucket.name, Key=f.relative_to(bucket).as_posix(), Body=f.read_bytes())
    ThreadedMotoServer("127.0.0.1", port, verbose=False).start()
    loader.stop()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]))
