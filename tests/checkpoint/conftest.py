"""The servers of the remote tests (nginx, moto's S3, a flaky HTTP server), as for shards."""

from tests.shards.conftest import flaky, nginx, s3, s3_server

__all__ = ["flaky", "nginx", "s3", "s3_server"]
