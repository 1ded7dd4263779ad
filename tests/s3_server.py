"""Buckets on the session's local S3 server (the ``moto_endpoint`` fixture of conftest.py)."""
from __future__ import annotations

import uuid

import boto3


def s3_bucket(endpoint: str, prefix: str = "mmgm") -> str:
    """A new bucket on the moto server at ``endpoint``; returns its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name
