"""A local S3 endpoint for tests: moto's S3 server in a thread, which pyarrow's S3FileSystem talks to through
``?endpoint_override=`` in an s3:// URI. moto keeps the buckets in memory; it checks no credentials."""

from __future__ import annotations

import contextlib
import logging
import os

BUCKET = "unipipe-test"
# Dummy credentials, and no lookups of an EC2 metadata service that is not there. Ray's processes (Train's
# controller, the workers) inherit the environment their node started with: a test cluster that must reach the
# server is started with these set (use_credentials), as a real cluster's nodes each have their own.
CREDENTIALS = dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true")


def use_credentials() -> None:
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def s3_endpoint():
    """Yields uri(path) -> an s3:// URI of ``path`` in a fresh bucket on a local server."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    env = CREDENTIALS
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    def uri(path: str, bucket: str = BUCKET) -> str:
        return f"s3://{bucket}/{path}?{query}"

    try:
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?{query}&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield uri
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
