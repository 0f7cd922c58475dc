"""Ray Train's checkpoint storage on object storage (``checkpoint.storage_path=s3://...``).

Used by ``orchestration.trainer``: ``arrow_filesystem(url, options)`` gives ``RunConfig`` a pyarrow S3
file system with the same endpoint and region as the shards' client (``pipeline.storage``), and the
path inside it.

S3 has no directories, but pyarrow's ``create_dir`` writes an empty ``key/`` object as a marker, which
several S3-compatible servers (rclone's among them) store as a file that then blocks every key below
it. :class:`ImplicitDirectories` forwards everything else and leaves directories implicit, as S3 does.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from pipeline.storage import StorageOptions, split_url


def arrow_filesystem(url: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """``(file system, bucket/prefix)`` for an ``s3://`` URL; credentials from the environment."""
    o = options or StorageOptions()
    endpoint = o.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": o.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if o.addressing_style == "virtual":
        kwargs["force_virtual_addressing"] = True
    s3 = pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v})
    bucket, prefix = split_url(url)
    return pafs.PyFileSystem(ImplicitDirectories(s3)), f"{bucket}/{prefix}".rstrip("/")


class ImplicitDirectories(pafs.FileSystemHandler):
    """A pyarrow file system that forwards everything but directory creation to ``fs``."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    def __eq__(self, other) -> bool:
        return isinstance(other, ImplicitDirectories) and self.fs.equals(other.fs)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "s3-implicit-dirs"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        return None

    def delete_dir(self, path):
        return self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        return self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        return self.fs.delete_file(path)

    def move(self, src, dest):
        return self.fs.move(src, dest)

    def copy_file(self, src, dest):
        return self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)
