"""Where shards live: a local (or shared) folder, or an S3-compatible object store (``s3://bucket/prefix``).

Library module, no CLI. ``pipeline.schema`` reads manifests and indexes through it, the readers
(``pipeline.samples``, ``pipeline.shard_cache``) read bytes by ``(shard, offset, length)`` through it,
and ``build-shards`` / ``verify-shards`` write and check through it.

- The client is boto3 (botocore's SigV4 signing, its credential chain: the AWS environment variables,
  ``AWS_PROFILE`` / ``~/.aws``, instance roles; ``AWS_ENDPOINT_URL`` for S3-compatible stores), with
  ``data.storage_options`` (endpoint, region, profile, addressing style) for explicit settings.
  Credentials never enter our configuration: nothing secret can reach MLflow or a checkpoint.
- Every request is retried with exponential backoff on connection failures, timeouts, 5xx and
  throttling, for up to ``retry_s`` seconds in all; then :class:`ObjectStoreError` names the object
  and why. Refusals that a retry cannot fix (no such bucket or key, credentials refused) fail at once.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REMOTE_SCHEMES = ("s3://",)
DEFAULT_RETRY_S = 120.0


class ObjectStoreError(Exception):
    """A request to the object store failed for good; the message names the object and the reason.
    Neither a ValueError (a bad sample's, which quarantine may swallow) nor a RuntimeError (a DALI
    failure's): it ends the pass, and a resume from the last checkpoint continues exactly."""


def is_remote(location: str | os.PathLike | None) -> bool:
    return str(location or "").startswith(REMOTE_SCHEMES)


@dataclass(frozen=True)
class StorageOptions:
    """Explicit object-store settings (``data.storage_options``); empty means the standard AWS ways
    (environment, profile). No credentials here: they come from the environment or a profile."""

    endpoint_url: str = ""  # e.g. http://minio:9000; else $AWS_ENDPOINT_URL, else AWS
    region: str = ""  # else $AWS_REGION / $AWS_DEFAULT_REGION / the profile's, else us-east-1
    profile: str = ""  # a profile of ~/.aws/config (else $AWS_PROFILE)
    addressing_style: str = "auto"  # "auto" | "path" (most S3-compatible servers) | "virtual"
    retry_s: float = DEFAULT_RETRY_S  # how long a failing request is retried before a named error

    def __post_init__(self) -> None:
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(
                f"data.storage_options.addressing_style: invalid value {self.addressing_style!r}"
            )
        if self.retry_s < 0:
            raise ValueError(f"data.storage_options.retry_s: invalid value {self.retry_s!r}")


_DEFAULT_OPTIONS = StorageOptions()


def configure(options: StorageOptions | dict | None) -> None:
    """Set this process's options for ``s3://`` locations (the loader and the worker call it with
    ``data.storage_options``, so that manifest reads anywhere in the process use the same store)."""
    global _DEFAULT_OPTIONS
    if isinstance(options, dict):
        options = StorageOptions(**options)
    _DEFAULT_OPTIONS = options or StorageOptions()


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (no trailing slash)."""
    rest = str(url)[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket; expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def join(location: str, name: str) -> str:
    """``name`` inside a location: a path for a folder, a URL for a prefix."""
    if is_remote(location):
        return f"{str(location).rstrip('/')}/{name}"
    return str(Path(location) / name)


# botocore error codes that a retry cannot fix, with what to tell the user
_REFUSALS = {
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "no such object",
    "404": "no such object",
    "NotFound": "no such object",
    "AccessDenied": "access denied (check the credentials and the bucket's policy)",
    "403": "access denied (check the credentials and the bucket's policy)",
    "InvalidAccessKeyId": "the access key is not known to the server",
    "SignatureDoesNotMatch": "the server refused the credentials (wrong secret key?)",
    "InvalidBucketName": "not a valid bucket name",
}


class S3Client:
    """One bucket/prefix on an S3-compatible store; thread-safe (one botocore client, pooled
    connections). Names passed to its methods are relative to the prefix."""

    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        self.url = str(url).rstrip("/")
        self.bucket, self.prefix = split_url(self.url)
        self.options = options or _DEFAULT_OPTIONS
        self._client = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __getstate__(self):  # a spawned DataLoader worker makes its own connection pool
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state) -> None:
        self.__init__(state["url"], state["options"])

    @property
    def client(self):
        with self._lock:
            if self._client is None or self._pid != os.getpid():  # a forked child: its own connections
                self._client, self._pid = self._make_client(), os.getpid()
            return self._client

    def _make_client(self):
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - boto3 is a dependency
            raise ObjectStoreError(f"{self.url}: reading s3:// needs boto3 ({exc})") from None
        o = self.options
        session = boto3.session.Session(profile_name=o.profile or None)
        region = o.region or session.region_name or "us-east-1"
        config = Config(
            retries={"mode": "standard", "max_attempts": 2},  # our own loop retries for retry_s
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=32,
            s3={"addressing_style": o.addressing_style},
            # botocore >= 1.36 adds CRC checksums to every PUT and checks them on GETs; S3-compatible
            # servers (rclone, older MinIO and Ceph) answer with checksums that do not match, so both
            # only where the API requires them. Our shards carry their own sha256 in the manifest.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return session.client("s3", endpoint_url=o.endpoint_url or None, region_name=region, config=config)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}" if name else self.url

    # --- requests, each retried for retry_s -------------------------------------------------------
    def _call(self, name: str, fn):
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        deadline = time.monotonic() + self.options.retry_s
        attempt = 0
        while True:
            try:
                return fn()
            except (NoCredentialsError, PartialCredentialsError):
                raise ObjectStoreError(
                    f"{self.where(name)}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "or AWS_PROFILE (data.storage_options.profile)"
                ) from None
            except ClientError as exc:
                err = exc.response.get("Error", {})
                code = str(err.get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                if code in _REFUSALS or status in (400, 401, 403, 404):
                    why = _REFUSALS.get(code) or f"refused ({code or status})"
                    raise ObjectStoreError(f"{self.where(name)}: {why}") from None
                reason = f"{code or 'HTTP'} {status}".strip()
            except (BotoCoreError, OSError) as exc:  # connection refused or reset, timeouts
                reason = type(exc).__name__
                detail = str(exc)
                if "Could not connect" in detail or "Connect timeout" in detail:
                    reason = f"cannot connect to {self.endpoint()}"
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise ObjectStoreError(
                    f"{self.where(name)}: {reason}; gave up after {attempt} attempts over "
                    f"{self.options.retry_s:g} s (data.storage_options.retry_s)"
                ) from None
            time.sleep(min(left, min(5.0, 0.2 * 2 ** min(attempt, 6)) * (0.5 + random.random())))

    def endpoint(self) -> str:
        try:
            return self.client.meta.endpoint_url
        except Exception:  # pragma: no cover - only for a message
            return "the endpoint"

    def get(self, name: str) -> bytes:
        def fn():
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()

        return self._call(name, fn)

    def get_range(self, name: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start``; a short answer (the object is shorter) is returned short."""

        def fn():
            rng = f"bytes={start}-{start + length - 1}"
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name), Range=rng)["Body"].read()

        return self._call(name, fn)

    def list(self) -> dict[str, tuple[int, str]]:
        """Every object under the prefix: name (relative) -> ``(size, ETag)``."""

        def fn():
            out, token = {}, None
            base = f"{self.prefix}/" if self.prefix else ""
            while True:
                kw = {"Bucket": self.bucket, "Prefix": base}
                if token:
                    kw["ContinuationToken"] = token
                r = self.client.list_objects_v2(**kw)
                for obj in r.get("Contents", []):
                    out[obj["Key"][len(base) :]] = (int(obj["Size"]), obj.get("ETag", "").strip('"'))
                if not r.get("IsTruncated"):
                    return out
                token = r["NextContinuationToken"]

        return self._call("", fn)

    def download(self, name: str, dest: str | Path, chunk: int = 8 << 20) -> tuple[int, str, str]:
        """Stream an object into ``dest``: ``(bytes, sha256, ETag)``; retried whole on failure."""

        def fn():
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            digest, n = hashlib.sha256(), 0
            with open(dest, "wb") as fh:
                for block in r["Body"].iter_chunks(chunk):
                    digest.update(block)
                    fh.write(block)
                    n += len(block)
            return n, digest.hexdigest(), r.get("ETag", "").strip('"')

        return self._call(name, fn)

    def put_file(self, name: str, path: str | Path) -> None:
        """Upload a file (multipart above 64 MB, parts of 64 MB: ``upload.file_etag`` computes the
        ETag the store gives it)."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, use_threads=True)
        key = self.key(name)
        self._call(name, lambda: self.client.upload_file(str(path), self.bucket, key, Config=config))

    def put_bytes(self, name: str, data: bytes) -> None:
        self._call(name, lambda: self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data))


_CLIENTS: dict[tuple[str, StorageOptions], S3Client] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(url: str, options: StorageOptions | None = None) -> S3Client:
    """This process's client for a bucket/prefix (one per location and options; a forked child makes
    its own connections, see ``S3Client.client``)."""
    options = options or _DEFAULT_OPTIONS
    key = (str(url).rstrip("/"), options)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = S3Client(key[0], options)
        return _CLIENTS[key]


def forget_clients() -> None:
    """Make clients afresh (after the credentials or the endpoint in the environment changed)."""
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


def read_text(location: str | os.PathLike) -> str | None:
    """A small text file at a path or an ``s3://`` URL; None when it is not there."""
    if is_remote(location):
        parent, _, name = str(location).rpartition("/")
        try:
            return client_for(parent).get(name).decode("utf-8")
        except ObjectStoreError as exc:
            if "no such object" in str(exc):
                return None
            raise
    try:
        return Path(location).read_text()
    except FileNotFoundError:
        return None


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a small text file at a path (atomically) or an ``s3://`` URL (one PUT: atomic there)."""
    if is_remote(location):
        parent, _, name = str(location).rpartition("/")
        client_for(parent).put_bytes(name, text.encode("utf-8"))
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
