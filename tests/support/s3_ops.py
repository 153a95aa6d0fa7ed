"""S3 operations with boto3 (SigV4, path-style), run by tests/s3.rs.

    python3 s3_ops.py ENDPOINT BUCKET PREFIX [OPERATION...]
    python3 s3_ops.py ENDPOINT BUCKET --create-bucket

Runs every operation against ENDPOINT (SeaweedFS itself, or the sidecar in
front of the filter) and prints one JSON object: each operation's name and
"ok" or the error, so the test can compare a run through both hops with the
control run straight to the store. Credentials come from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY.
"""
import hashlib
import json
import sys
import urllib.request

import boto3
from botocore.config import Config

endpoint, bucket, prefix, only = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    region_name="us-east-1",
    config=Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1, "mode": "standard"},
        # Checksums only when the operation needs one: SeaweedFS and older
        # stores do not all take the newer CRC trailers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    ),
)
results = {}
if prefix == "--create-bucket":
    s3.create_bucket(Bucket=bucket)
    sys.exit(0)


def op(name, fn):
    try:
        fn()
        results[name] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
        results[name] = f"{type(e).__name__}: {e}"[:300]


def key(k):
    return f"{prefix}{k}"


def put():
    s3.put_object(Bucket=bucket, Key=key("a.txt"), Body=b"hello a")


def overwrite():
    """Only when named: the zombie's write, which must not land."""
    s3.put_object(Bucket=bucket, Key=key("a.txt"), Body=b"written by the zombie")


def get():
    body = s3.get_object(Bucket=bucket, Key=key("a.txt"))["Body"].read()
    assert body == b"hello a", body


def head():
    assert s3.head_object(Bucket=bucket, Key=key("a.txt"))["ContentLength"] == 7


def copy():
    s3.copy_object(Bucket=bucket, Key=key("b.txt"), CopySource={"Bucket": bucket, "Key": key("a.txt")})
    assert s3.get_object(Bucket=bucket, Key=key("b.txt"))["Body"].read() == b"hello a"


def listing():
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert key("a.txt") in keys and key("b.txt") in keys, keys


def delete():
    s3.delete_object(Bucket=bucket, Key=key("b.txt"))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert key("b.txt") not in keys, keys


def delete_objects():
    for k in ("d1", "d2"):
        s3.put_object(Bucket=bucket, Key=key(k), Body=b"x")
    r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key("d1")}, {"Key": key("d2")}]})
    assert not r.get("Errors"), r
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert key("d1") not in keys and key("d2") not in keys, keys


def multipart():
    part = 5 * 1024 * 1024
    data = bytes(range(256)) * (20 * 1024 * 1024 // 256)
    up = s3.create_multipart_upload(Bucket=bucket, Key=key("big.bin"))
    parts = []
    for i in range(0, len(data), part):
        n = i // part + 1
        r = s3.upload_part(Bucket=bucket, Key=key("big.bin"), UploadId=up["UploadId"], PartNumber=n, Body=data[i : i + part])
        parts.append({"ETag": r["ETag"], "PartNumber": n})
    s3.complete_multipart_upload(
        Bucket=bucket, Key=key("big.bin"), UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    got = s3.get_object(Bucket=bucket, Key=key("big.bin"))["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), len(got)


def presigned_put():
    url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": key("p.txt")}, ExpiresIn=300)
    req = urllib.request.Request(url, data=b"presigned", method="PUT")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200, r.status
    assert s3.get_object(Bucket=bucket, Key=key("p.txt"))["Body"].read() == b"presigned"


for name, fn in [
    ("put", put),
    ("get", get),
    ("head", head),
    ("copy", copy),
    ("list", listing),
    ("delete", delete),
    ("delete_objects", delete_objects),
    ("multipart", multipart),
    ("presigned_put", presigned_put),
    ("overwrite", overwrite),
]:
    if (not only and name != "overwrite") or name in only:
        op(name, fn)
print(json.dumps(results, sort_keys=True))
