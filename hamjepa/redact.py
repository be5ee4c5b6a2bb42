"""Mask credentials in URIs before they are printed or logged.

A tracking URI (`http://user:secret@host:5000`, `postgresql://user:secret@db/mlflow`) or a storage path
(`s3://KEY:SECRET@bucket/ray`, a presigned URL's `X-Amz-Signature=...`) may carry a secret; every message
that shows one goes through `mask_uri` (one URI) or `mask_text` (a message that may contain URIs):

    http://user:secret@host:5000       -> http://user:***@host:5000
    https://host/path?token=abc&page=2 -> https://host/path?token=***&page=2

The user name, host, port, path and harmless query parameters stay, so the message still says where.
"""

from __future__ import annotations

import re

MASK = "***"

# A query or fragment parameter whose name contains one of these holds a secret (access_token, api_key,
# X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, password, client_secret, sig, auth, ...).
_SECRET_NAME = re.compile(r"token|passw|pwd|secret|sig|credential|key|auth", re.IGNORECASE)
# The scheme of a URI: what comes before '://'.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# key=value pairs of a query string or fragment.
_PARAMETER = re.compile(r"(?P<lead>^|[?&;#])(?P<name>[^=&;#?]+)=(?P<value>[^&;#]*)")
# URIs inside free text: a scheme, '://', then anything up to white space or a quote, less the punctuation
# that ends a sentence or closes a parenthesis.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:!?)\]]")


def _mask_parameters(text: str) -> str:
    def replace(match: re.Match) -> str:
        if not _SECRET_NAME.search(match["name"]):
            return match[0]
        return f"{match['lead']}{match['name']}={MASK}"

    return _PARAMETER.sub(replace, text)


def mask_uri(uri: str) -> str:
    """The URI with the password of its userinfo and the values of token-like parameters replaced by ***.

    The userinfo ends at the last '@' before the query, not at the first '/': AWS secret keys contain '/', and
    `s3://KEY:SE/CRET@bucket` must not leak `CRET`. A rare '@' in a path after a port is masked too (never leaked).
    """
    scheme = _SCHEME.match(uri)
    if scheme is None:
        return uri
    rest = uri[scheme.end():]
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    locator, parameters = rest[:end], rest[end:]
    at = locator.rfind("@")
    if at > 0 and ":" in locator[:at]:
        locator = locator[:locator.index(":")] + ":" + MASK + locator[at:]
    return scheme[0] + locator + _mask_parameters(parameters)


def mask_text(text: str) -> str:
    """`text` with every URI in it masked (error messages, summaries)."""
    return _URI_IN_TEXT.sub(lambda match: mask_uri(match[0]), text)
