"""A remote filesystem for tests: Beam's local filesystem under the URL scheme ``spatexttest://``, rooted at a folder
(``RemoteTestFileSystem.root``). To Beam's registry and to spatext it is remote, as gs:// is (paths are URLs, nothing
is reachable with ``os``), but its files lie on this machine. Like an object store it writes a file whole when it is
closed (none of it is listed before), and a missing file's ``open``, ``last_updated`` or ``metadata`` raises what
Beam's GCS filesystem raises (``NotFound``, not an OSError)."""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import uuid

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "spatexttest"


class NotFound(Exception):  # noqa: N818 - named as google.cloud.exceptions.NotFound, which is not an OSError
    """What Beam's GCS filesystem raises for a missing object."""


class _ObjectWriter(io.BytesIO):
    """A file being written to an object store: nothing is there until it is closed, then all of it at once."""

    def __init__(self, path: str, uploads: str) -> None:
        super().__init__()
        self.path, self.uploads = path, uploads

    def close(self) -> None:
        if not self.closed:
            os.makedirs(self.uploads, exist_ok=True)
            part = os.path.join(self.uploads, uuid.uuid4().hex)
            with open(part, "wb") as handle:
                handle.write(self.getvalue())
            os.makedirs(os.path.dirname(self.path), exist_ok=True)  # object stores have no folders to make
            os.replace(part, self.path)
        super().close()


class RemoteTestFileSystem(LocalFileSystem):
    """``spatexttest://PATH`` is ``root``/PATH on this machine."""

    root = ""

    @classmethod
    def scheme(cls) -> str:
        return SCHEME

    def _local(self, path: str) -> str:
        if not path.startswith(f"{SCHEME}://"):
            raise ValueError(f"not a {SCHEME}:// path: {path!r}")
        return os.path.join(self.root, path[len(SCHEME) + 3:])

    def _url(self, local: str) -> str:
        return f"{SCHEME}://" + os.path.relpath(local, self.root)

    def _missing(self, path: str) -> None:
        if not os.path.exists(self._local(path)):
            raise NotFound(f"Object {path} not found")

    def join(self, basepath, *paths):  # noqa: ANN001, ANN201, D102
        return posixpath.join(basepath, *paths)

    def split(self, path):  # noqa: ANN001, ANN201, D102
        head, tail = posixpath.split(self._local(path)[len(self.root):].lstrip("/"))
        return f"{SCHEME}://{head}", tail

    def _url_dirname(self, url_or_path):  # noqa: ANN001, ANN202
        return self.split(url_or_path)[0]

    def _list(self, dir_or_prefix):  # noqa: ANN001, ANN202
        root = self._local(dir_or_prefix)
        for folder, _, files in os.walk(root):
            for name in files:
                local = os.path.join(folder, name)
                try:  # a listing is a snapshot: a file deleted meanwhile is not in it
                    meta = FileMetadata(self._url(local), os.path.getsize(local), os.path.getmtime(local))
                except FileNotFoundError:
                    continue
                yield meta

    def mkdirs(self, path):  # noqa: ANN001, ANN201, D102
        os.makedirs(self._local(path), exist_ok=True)

    def create(self, path, *args, **kwargs):  # noqa: ANN001, ANN201, D102
        return _ObjectWriter(self._local(path), os.path.join(self.root, ".uploads"))

    def open(self, path, *args, **kwargs):  # noqa: ANN001, ANN201, D102
        self._missing(path)
        return super().open(self._local(path), *args, **kwargs)

    def copy(self, sources, destinations):  # noqa: ANN001, ANN201, D102
        for source, destination in zip(sources, destinations, strict=True):
            os.makedirs(os.path.dirname(self._local(destination)), exist_ok=True)
            shutil.copyfile(self._local(source), self._local(destination))

    def rename(self, sources, destinations):  # noqa: ANN001, ANN201, D102
        for source, destination in zip(sources, destinations, strict=True):
            os.makedirs(os.path.dirname(self._local(destination)), exist_ok=True)
            os.replace(self._local(source), self._local(destination))

    def exists(self, path):  # noqa: ANN001, ANN201, D102
        return os.path.exists(self._local(path))

    def size(self, path):  # noqa: ANN001, ANN201, D102
        self._missing(path)
        return os.path.getsize(self._local(path))

    def last_updated(self, path):  # noqa: ANN001, ANN201, D102
        self._missing(path)
        return os.path.getmtime(self._local(path))

    def checksum(self, path):  # noqa: ANN001, ANN201, D102
        return str(self.size(path))

    def metadata(self, path):  # noqa: ANN001, ANN201, D102
        self._missing(path)
        local = self._local(path)
        return FileMetadata(path, os.path.getsize(local), os.path.getmtime(local))

    def delete(self, paths):  # noqa: ANN001, ANN201, D102
        from apache_beam.io.filesystem import BeamIOError

        missing = {p: NotFound(f"Object {p} not found") for p in paths if not os.path.exists(self._local(p))}
        if missing:
            raise BeamIOError("Delete operation failed", missing)
        for path in paths:
            local = self._local(path)
            shutil.rmtree(local) if os.path.isdir(local) else os.remove(local)
