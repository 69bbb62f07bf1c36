"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1 (no mocked client, no network
beyond the loopback). Import the fixture where it is needed: `from conftest_s3 import s3_server`.

The server and its dummy credentials live for the test session; the environment is restored and the
server stopped afterwards.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import pytest

BUCKET = "raysim-test"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str                  # http://127.0.0.1:PORT
    bucket: str

    def uri(self, prefix: str | None = None) -> str:
        """An s3:// URI of a fresh prefix (or `prefix`) in the bucket, with the endpoint in its options."""
        prefix = prefix or f"t-{uuid.uuid4().hex[:12]}"
        return (f"s3://{self.bucket}/{prefix}?endpoint_override={quote(self.endpoint, safe='')}"
                f"&scheme=http&region={REGION}")

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region=REGION,
                                 allow_bucket_creation=True)


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)          # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as env:
            for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                env.delenv(key, raising=False)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", REGION)
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")             # never probe a metadata service
            s3 = S3Server(f"http://{host}:{port}", BUCKET)
            s3.filesystem().create_dir(BUCKET)
            yield s3
    finally:
        server.stop()
