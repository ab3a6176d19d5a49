"""The shared services are real servers answering over HTTP on loopback."""

import urllib.request


def test_mlflow_server_answers(mlflow_server):
    with urllib.request.urlopen(f"{mlflow_server.url}/health") as r:
        assert r.status == 200


def test_s3_server_roundtrip(s3_server, s3_bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    s3.put_object(Bucket=s3_bucket, Key="k", Body=b"hello")
    assert s3.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"hello"
