"""Real servers for the tests, on 127.0.0.1 only, started and stopped by fixtures, bounded in time.

- `s3_server`: an S3-compatible server (moto's, in a thread); yields the environment a client needs
  (AWS_ENDPOINT_URL, keys, region), with a bucket created.
- `mlflow_server`: `mlflow server` with a SQLite backend store, in a subprocess; yields its URI.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

BUCKET = "rlhf-test"
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = START_TIMEOUT_S, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on loopback, a bucket in it; the AWS_* variables to reach it."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    wait_http(env["AWS_ENDPOINT_URL"] + "/moto-api/")
    fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                    endpoint_override=f"{host}:{port}", allow_bucket_creation=True).create_dir(BUCKET)
    yield env
    server.stop()


@pytest.fixture
def s3_env(s3_server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process talks to the S3 server, and caches remote files under tmp_path."""
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RLHF_JOBS_CACHE_DIR", str(tmp_path / "cache"))
    return {**s3_server, "RLHF_JOBS_CACHE_DIR": str(tmp_path / "cache")}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on loopback with a SQLite backend store; its tracking URI."""
    pytest.importorskip("mlflow", reason="mlflow is in the dev extra")
    work = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
               "--default-artifact-root", str(work / "artifacts"), "--workers", "1"]
    log = (work / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=120, process=process)
        yield uri
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)
        log.close()
