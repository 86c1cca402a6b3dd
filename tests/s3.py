"""A real S3 server on loopback for the tests: moto's threaded server (moto[server], in the test
extras) on 127.0.0.1 with one empty bucket, reached the way a user reaches MinIO or another
S3-compatible store, through the URI's own options."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs
from moto.server import ThreadedMotoServer

# moto accepts any credentials. Processes started from the test (Ray workers, DVC's stages) inherit them.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port
    bucket: str
    fs: pyarrow.fs.S3FileSystem  # the server's filesystem, to look at what the code wrote

    def uri(self, prefix: str) -> str:
        """``s3://<bucket>/<prefix>`` with the options that point pyarrow and s3fs at this server."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under ``<bucket>/<prefix>``, as ``<bucket>/<key>``."""
        base = f"{self.bucket}/{prefix}".rstrip("/")
        selector = pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
        return sorted(info.path for info in self.fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.File)


@contextlib.contextmanager
def s3_server(monkeypatch, bucket: str = "uml-runs") -> Iterator[S3Server]:
    """The server with ``bucket`` created, and the credentials in this process's environment."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in CREDENTIALS.items():
            monkeypatch.setenv(key, value)
        fs = pyarrow.fs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                                     access_key="test", secret_key="test", allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield S3Server(f"{host}:{port}", bucket, fs)
    finally:
        server.stop()
