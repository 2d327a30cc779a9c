"""moto's S3 server on a free loopback port for the bucket tests (tests/test_warehouse_s3*.py,
tests/test_sweep_dask.py): the standard AWS settings for it in this process's environment
(child processes inherit them), restored afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# Every bucket test module imports this one: without the s3 pieces the module is skipped
# with the install command, here once instead of in each module.
pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed: pip install "
                                   "'mlsae[s3]'")
pytest.importorskip("moto.server", reason="moto[server] (dev extra) is not installed")


@contextmanager
def moto_s3(tmp_path_factory, *buckets: str, scratch: bool = True) -> Iterator[dict[str, str]]:
    """Start the server, point AWS_ENDPOINT_URL at it, make `buckets`; yield the env."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
           "MLSAE_MIRROR_DIR": str(tmp_path_factory.mktemp("mirror"))}
    if scratch:
        env["MLSAE_SCRATCH"] = str(tmp_path_factory.mktemp("scratch"))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    # fsspec keeps filesystem instances across tests: one made for another module's server
    # would still talk to that (stopped) endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        for bucket in buckets:
            s3fs.S3FileSystem().mkdir(bucket)
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
