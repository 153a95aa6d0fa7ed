"""One S3 call with boto3 (SigV4), run by tests/s3.rs for the `--store s3` rules.

    python3 s3_call.py '{"endpoint": URL, "op": OP, "bucket": B, ...}'

Options: "style" ("path" or "virtual"), "proxy" (send through this HTTP
proxy, for virtual-hosted names that do not resolve), "lock" and "token"
(Fencing-Lock / Fencing-Token headers, as a sidecar would add), "key",
"keys", "data", "send_as" ({"url": base URL, "headers": {...}}: after signing,
send to that URL instead, with these headers set: a request signed for one
place and sent as another), "at" (path and query to sign and send instead of the
operation's own, e.g. "/bucket/a/x?delete=": the same body at another address), "send_at" (the
same, after signing: a spelling the store reads as what was signed). Ops: put, get, delete, delete_objects, create_bucket, list, post_policy ("size": bytes;
"smuggle": a hand-made first part, see the op; "after_file"; "at": another path; "content_type"), raw
("method", "path" with query, "headers", "body" text: signed as they are; "md5": add Content-MD5), mpu_start
(prints "upload_id"), list_parts ("upload_id"; prints "parts", their numbers).
Prints {"status": HTTP status, "body": the raw response body, "keys": [...]}.
Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""
import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

a = json.loads(sys.argv[1])
cfg = dict(
    signature_version="s3v4",
    s3={"addressing_style": a.get("style", "path")},
    retries={"max_attempts": 1, "mode": "standard"},
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)
if a.get("proxy"):
    cfg["proxies"] = {"http": a["proxy"]}
s3 = boto3.client("s3", endpoint_url=a["endpoint"], region_name="us-east-1", config=Config(**cfg))
last = {}


def fence(request, **_):
    if a.get("lock"):
        request.headers["Fencing-Lock"] = a["lock"]
        request.headers["Fencing-Token"] = str(a["token"])


def keep(http_response, **_):
    last["status"] = http_response.status_code
    last["body"] = http_response.content.decode("utf-8", "replace")


def send_as(request, **_):
    to = a["send_as"]
    path = request.url.split("/", 3)[3] if request.url.count("/") >= 3 else ""
    request.url = to["url"].rstrip("/") + "/" + path
    for k, v in to.get("headers", {}).items():
        request.headers[k] = v


def relocate(to):
    def handler(request, **_):
        scheme, _, host = request.url.split("/", 3)[:3]
        request.url = f"{scheme}//{host}{to}"

    return handler


def send_raw(url, method, headers, body):
    """Sends a request boto3 did not make (with the fencing headers), keeping its status and body."""
    import urllib.error
    import urllib.request

    headers = dict(headers)
    if a.get("lock"):
        headers.update({"Fencing-Lock": a["lock"], "Fencing-Token": str(a["token"])})
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            last.update(status=r.status, body=r.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as e:
        last.update(status=e.code, body=e.read().decode("utf-8", "replace"))


s3.meta.events.register("before-sign.s3.*", fence)
if a.get("at"):
    s3.meta.events.register("before-sign.s3.*", relocate(a["at"]))
if a.get("send_at"):
    s3.meta.events.register("before-send.s3.*", relocate(a["send_at"]))
if a.get("send_as"):
    s3.meta.events.register("before-send.s3.*", send_as)
s3.meta.events.register("after-call.s3.*", keep)
out = {}
try:
    op, bucket = a["op"], a["bucket"]
    if op == "put":
        s3.put_object(Bucket=bucket, Key=a["key"], Body=a.get("data", "x").encode())
    elif op == "delete_objects":
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in a["keys"]]})
    elif op == "create_bucket":
        s3.create_bucket(Bucket=bucket)
    elif op == "post_policy":
        # A browser-style upload: the form's fields (key first), then the file.
        from urllib3 import encode_multipart_formdata

        p = s3.generate_presigned_post(Bucket=bucket, Key=a["key"])
        size = a.get("size", 0)
        data = (a.get("data", "x") * (size // max(len(a.get("data", "x")), 1) + 1))[: size or None]
        fields = list(p["fields"].items()) + [("file", ("up.txt", data.encode()))]
        if a.get("smuggle") is not None:
            # A hand-made form: "smuggle" (text with {B} for the boundary) first, then the presigned fields.
            # "after_file": the presigned fields after the file part instead.
            b = "fgB0undary"
            body = a["smuggle"].replace("{B}", b).encode() + b"\r\n" if a["smuggle"] else b""
            presigned = b""
            for k, v in p["fields"].items():
                presigned += f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            file = f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="up.txt"\r\n\r\n'.encode()
            file += data.encode() + b"\r\n"
            body += file + presigned if a.get("after_file") else presigned + file
            body += f"--{b}--\r\n".encode()
            ctype = a.get("content_type", f"multipart/form-data; boundary={b}")
        else:
            body, ctype = encode_multipart_formdata(fields)
        headers = {"Content-Type": ctype}
        url = p["url"].rstrip("/")
        if a.get("at"):
            url = "/".join(url.split("/", 3)[:3]) + a["at"]
        send_raw(url, "POST", headers, body)
    elif op == "mpu_start":
        out["upload_id"] = s3.create_multipart_upload(Bucket=bucket, Key=a["key"])["UploadId"]
    elif op == "list_parts":
        r = s3.list_parts(Bucket=bucket, Key=a["key"], UploadId=a["upload_id"])
        out["parts"] = [p["PartNumber"] for p in r.get("Parts", [])]
    elif op == "raw":
        # A request as given, signed (SigV4) for exactly what is sent.
        import base64
        import hashlib

        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        body = a.get("body", "").encode()
        headers = dict(a.get("headers", {}))
        if a.get("md5"):
            headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()
        url = a["endpoint"].rstrip("/") + a["path"]
        signed = AWSRequest(method=a["method"], url=url, data=body, headers=headers)
        S3SigV4Auth(s3._request_signer._credentials, "s3", "us-east-1").add_auth(signed)
        send = dict(signed.headers.items())
        send_raw(url, a["method"], send, body)
    elif op == "get":
        data = s3.get_object(Bucket=bucket, Key=a["key"])["Body"].read()
        out["size"] = len(data)
        out["same_byte"] = len(set(data)) == 1
    elif op == "delete":
        s3.delete_object(Bucket=bucket, Key=a["key"])
    elif op == "list":
        r = s3.list_objects_v2(Bucket=bucket)
        out["keys"] = sorted(o["Key"] for o in r.get("Contents", []))
        out["sizes"] = {o["Key"]: o["Size"] for o in r.get("Contents", [])}
    else:
        raise SystemExit(f"unknown op {op}")
except ClientError as e:
    last.setdefault("status", e.response["ResponseMetadata"]["HTTPStatusCode"])
out.update(last)
print(json.dumps(out))
