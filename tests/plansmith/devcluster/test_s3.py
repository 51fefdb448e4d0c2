"""The moto S3 endpoint speaks real S3 over HTTP, checksums included (GUIDE.md §3)."""

from __future__ import annotations

import hashlib

import boto3
from botocore.config import Config


def test_put_and_get_with_sha256_checksums(s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="k", aws_secret_access_key="s",
                      config=Config(request_checksum_calculation="when_required"))
    s3.create_bucket(Bucket="harness")
    payload = b"engine bytes" * 1000
    s3.put_object(Bucket="harness", Key="a/b", Body=payload, ChecksumAlgorithm="SHA256")
    got = s3.get_object(Bucket="harness", Key="a/b", ChecksumMode="ENABLED")
    assert hashlib.sha256(got["Body"].read()).digest() == hashlib.sha256(payload).digest()
