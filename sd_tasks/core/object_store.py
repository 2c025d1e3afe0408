"""What an object store (S3 and S3-compatible stores, through fsspec and s3fs) can answer besides the data, as one
line each: a URI without a bucket and refused credentials (65: a retry cannot help), a store that does not answer
(Unavailable, exit 1: the step's retry, once it is back, can succeed). sd_tasks.core.storage wraps every remote call in
`object_store`."""
from __future__ import annotations

import contextlib
from typing import Iterator

from sd_tasks.core.errors import StepError, Unavailable


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


@contextlib.contextmanager
def object_store(uri: str) -> Iterator[None]:
    """An object store that does not answer (down, unreachable, the connection dropped), after botocore's and
    s3fs's own retries, is one line naming the URI: the step's retry, once it is back, can succeed."""
    if is_remote(uri):
        from fsspec.asyn import get_loop

        check_remote_uri(uri)
        get_loop().set_exception_handler(_report_unless_dropped)
    try:
        yield
    except Exception as exc:
        if refused := _refused(exc):  # credentials missing or refused, no such bucket: a retry cannot help
            raise StepError(f"{uri}: {refused}") from None
        if not _unreachable(exc):
            raise
        raise Unavailable(f"{uri}: object store unreachable ({type(exc).__name__}: {exc})".splitlines()[0]) from None


def check_remote_uri(uri: str) -> None:
    """An object-store URI names a bucket (s3://bucket/prefix): `s3://` alone would list every bucket."""
    scheme, _, rest = str(uri).partition("://")
    if scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs") and not rest.split("/")[0]:
        raise StepError(f"{uri}: no bucket; write {scheme}://bucket/prefix")


def _refused(exc: Exception) -> str | None:
    """Why the object store refuses us, in words, when no retry can change it; None for anything else."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return None
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return f"no S3 credentials ({exc}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a role)"
    if isinstance(exc, PermissionError):
        return f"access denied ({str(exc).splitlines()[0][:200]})"
    return None


def _report_unless_dropped(loop, context: dict) -> None:
    """fsspec's event loop's handler of errors nobody awaited. When a connection drops mid-upload, aiohttp leaves
    behind a task whose write failed, and asyncio printed it when it was collected ("Task exception was never
    retrieved" and a traceback) beside the step's own line that already says the store is unreachable. Such
    connection errors are dropped; any other error is reported as asyncio would."""
    if not _unreachable(context.get("exception")):
        loop.default_exception_handler(context)


def _unreachable(exc: Exception | None) -> bool:
    try:
        from aiohttp import ClientConnectionError
        from botocore.exceptions import ConnectionError as EndpointDown, HTTPClientError
    except ImportError:  # without s3fs there is no object store
        return False
    return isinstance(exc, (EndpointDown, HTTPClientError, ClientConnectionError))
