"""``data.root`` on object storage: one URI form for the store (zarr through fsspec/s3fs) and for
Ray's run storage (pyarrow).

A URI is ``s3://bucket/prefix`` with, optionally, the query options that Ray's pyarrow
filesystem reads for an S3-compatible server (the form ``ray.storage_path`` already takes):
``endpoint_override=host:port``, ``scheme=http|https`` and ``region=...``; credentials come from
the usual AWS environment variables or files. The same options reach s3fs (which zarr reads and
writes through) translated to its ``endpoint_url`` and ``region_name``, so one URI names the same
bucket for both libraries.

Only ``s3://`` is accepted: it is the scheme the tests run against a real S3 server (moto) on
loopback. Nothing here imports s3fs until a URI is opened; ``pip install s3fs`` (the ``s3``
extra) provides it.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

SCHEMES = ("s3",)
# pyarrow.fs.S3FileSystem's URI options that have an s3fs equivalent.
QUERY_OPTIONS = ("endpoint_override", "scheme", "region")


def is_uri(location: str | None) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a filesystem path."""
    return bool(location) and "://" in str(location)


def check_uri(uri: str) -> str:
    """``uri`` if it is a usable object-storage URI, else a ``ValueError`` that names what is wrong."""
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"the URI {uri!r} has the scheme {parts.scheme!r}; object storage here is {', '.join(s + '://' for s in SCHEMES)} "
                         "(an S3-compatible server through ?endpoint_override=host:port&scheme=http)")
    if not parts.netloc:
        raise ValueError(f"the URI {uri!r} names no bucket (s3://<bucket>/<prefix>)")
    unknown = sorted({key for key, _ in parse_qsl(parts.query, keep_blank_values=True)} - set(QUERY_OPTIONS))
    if unknown:
        raise ValueError(f"the URI {uri!r} has the options {unknown}; the ones understood are {list(QUERY_OPTIONS)} "
                         "(credentials come from the AWS environment variables)")
    if parts.fragment:
        raise ValueError(f"the URI {uri!r} has a fragment (#...)")
    return uri


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended to its path, its query options kept: ``join("s3://b/x?scheme=http",
    "ray")`` is ``"s3://b/x/ray?scheme=http"``."""
    split = urlsplit(uri)
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return split._replace(path=path).geturl()


def bucket_path(uri: str) -> str:
    """``bucket/prefix`` of ``uri`` (how fsspec and pyarrow name an object), without the options."""
    split = urlsplit(uri)
    return f"{split.netloc}{split.path}".rstrip("/")


def without_options(uri: str) -> str:
    """``uri`` without its query options (for messages and for fsspec, which does not read them)."""
    split = urlsplit(uri)
    return split._replace(query="").geturl()


def fsspec_options(uri: str) -> dict[str, Any]:
    """s3fs's ``storage_options`` equivalent to the URI's pyarrow options."""
    query = dict(parse_qsl(urlsplit(uri).query))
    client: dict[str, Any] = {}
    if "endpoint_override" in query:
        client["endpoint_url"] = f"{query.get('scheme', 'https')}://{query['endpoint_override']}"
    if "region" in query:
        client["region_name"] = query["region"]
    return {"client_kwargs": client} if client else {}


def filesystem(uri: str, asynchronous: bool = False) -> Any:
    """The fsspec filesystem of ``uri`` (s3fs), configured from its options. An ``ImportError``
    with the install command when s3fs is missing."""
    import fsspec

    # aiobotocore logs at INFO where it found the credentials, once per filesystem.
    logging.getLogger("aiobotocore.credentials").setLevel(logging.WARNING)
    scheme = urlsplit(uri).scheme
    try:
        cls = fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        raise ImportError(f"{without_options(uri)}: reading and writing {scheme}:// needs s3fs: "
                          "pip install s3fs (or the extra: pip install -e '.[s3]')") from exc
    # skip_instance_cache: a filesystem made in a parent process must not be reused after a fork.
    return cls(asynchronous=asynchronous, skip_instance_cache=True, **fsspec_options(uri))


def describe(uri: str) -> str:
    """The URI as messages show it, with its endpoint when it has one."""
    query = dict(parse_qsl(urlsplit(uri).query))
    endpoint = f" (endpoint {query.get('scheme', 'https')}://{query['endpoint_override']})" if "endpoint_override" in query else ""
    return without_options(uri) + endpoint

