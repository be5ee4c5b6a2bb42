"""Mask credentials before a URI, a message or an error is printed or logged.

A tracking URI (`http://user:secret@host:5000`, `postgresql://user:secret@db/mlflow`), a storage path
(`s3://KEY:SECRET@bucket/ray`, a presigned URL's `X-Amz-Signature=...`), a token-only URL
(`https://ghp_token@github.com/...`), an environment dump (`MLFLOW_TRACKING_PASSWORD=...`) or an HTTP header
(`Authorization: Bearer ...`) may carry a secret; every message that shows one goes through `mask_uri` (one URI)
or `mask_text` (free text: error messages, summaries, log lines):

    http://user:secret@host:5000          -> http://user:***@host:5000
    https://ghp_abc@github.com/o/r        -> https://***@github.com/o/r
    https://host/path?token=abc&page=2    -> https://host/path?token=***&page=2
    MLFLOW_TRACKING_PASSWORD=abc          -> MLFLOW_TRACKING_PASSWORD=***
    Authorization: Bearer abc             -> Authorization: Bearer ***

The user name (when a password follows it), host, port, path and harmless query parameters stay, so the
message still says where. A userinfo without a password is masked whole: a token used as the user name
(`https://<token>@github.com`) cannot be told from a user name, and the host still says where.
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
# What follows the '@' of a userinfo: a host (a name, an IPv4 address or a bracketed IPv6 one), an optional
# port, then the end of the authority.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::\d*)?(?=[/?#]|$)")
# A port right after the host: digits, then the end of the authority (so `host:5000/x` has no password).
_PORT = re.compile(r"\d*(?=[/?#]|$)")
# URIs inside free text: a scheme, '://', then anything up to white space or a quote, less the punctuation
# that ends a sentence or closes a parenthesis.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:!?)\]]")
# NAME=value and NAME: value pairs whose name says it holds a secret: *PASSWORD / *PASSWD, anything with SECRET
# (AWS_SECRET_ACCESS_KEY, client_secret), *_TOKEN or TOKEN alone (not token_dim), *API_KEY; the name may be
# quoted (a dict's repr, JSON), the value quoted or bare (up to white space or a quote).
_SECRET_PAIR = re.compile(
    r"""(?P<key>(?<![\w.-])["']?(?:[\w.-]*(?:password|passwd|secret)[\w.-]*|(?:[\w.-]*[_.-])?(?:token|api[_-]?key))"""
    r"""["']?\s*[=:]\s*)(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s"']+)""",
    re.IGNORECASE)
# An Authorization header's value (also Proxy-Authorization, and `"Authorization": "..."` in a dict or JSON):
# the scheme word stays (Bearer, Basic, token, AWS4-HMAC-SHA256), the rest of the value is masked.
_AUTHORIZATION = re.compile(
    r"""(?P<key>authorization["']?\s*[:=]\s*(?P<quote>["']?))(?P<scheme>(?:bearer|basic|token|digest|negotiate|"""
    r"""aws4-hmac-sha256)\s+)?(?P<value>[^\n"']*)""",
    re.IGNORECASE)


def _mask_parameters(text: str) -> str:
    def replace(match: re.Match) -> str:
        if not _SECRET_NAME.search(match["name"]):
            return match[0]
        return f"{match['lead']}{match['name']}={MASK}"

    return _PARAMETER.sub(replace, text)


def _userinfo(rest: str) -> tuple[str, str]:
    """(the userinfo with its '@', masked, or ""; the rest from the host on) of a URI less its scheme.

    The user name ends at the first of ':/?#@'. After a ':' comes either a port (digits, then the end of the
    authority) or a password, which may itself hold '/', '?', '#' or '@' (AWS secret keys hold '/'): the
    password then ends at the last '@' that a host follows, so none of it is left showing. A password can mask a
    later '@' in a query too (`?mail=a@b`): more is hidden than needed, never less.
    """
    end_of_user = next((i for i, c in enumerate(rest) if c in ":/?#@"), len(rest))
    separator = rest[end_of_user:end_of_user + 1]
    if separator == "@":  # a userinfo without a password: a user name or a token, masked whole
        return (MASK + "@" if end_of_user else "@"), rest[end_of_user + 1:]
    if separator == ":" and not _PORT.match(rest, end_of_user + 1):
        ats = [i for i in range(end_of_user + 1, len(rest)) if rest[i] == "@" and _HOST.match(rest, i + 1)]
        if ats:
            return f"{rest[:end_of_user]}:{MASK}@", rest[ats[-1] + 1:]
    return "", rest


def mask_uri(uri: str) -> str:
    """The URI with the password of its userinfo (or a userinfo without one) and the values of token-like
    parameters replaced by ***."""
    scheme = _SCHEME.match(uri)
    if scheme is None:
        return uri
    userinfo, rest = _userinfo(uri[scheme.end():])
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    return scheme[0] + userinfo + rest[:cut] + _mask_parameters(rest[cut:])


def _mask_free_text(text: str) -> str:
    """Secret NAME=value pairs and Authorization values in text that holds no URI."""
    text = _AUTHORIZATION.sub(lambda m: f"{m['key']}{m['scheme'] or ''}{MASK if m['value'].strip() else m['value']}",
                              text)

    def pair(match: re.Match) -> str:
        value = match["value"]
        if value == MASK or value.strip("\"'") == MASK:
            return match[0]
        quote = value[0] if value[:1] in "\"'" and len(value) > 1 else ""
        return f"{match['key']}{quote}{MASK}{quote}"

    return _SECRET_PAIR.sub(pair, text)


def mask_text(text: str) -> str:
    """`text` with every URI in it masked (mask_uri), and outside the URIs every secret NAME=value pair and
    Authorization header value (error messages, summaries, log lines)."""
    pieces, last = [], 0
    for match in _URI_IN_TEXT.finditer(text):
        pieces += [_mask_free_text(text[last:match.start()]), mask_uri(match[0])]
        last = match.end()
    pieces.append(_mask_free_text(text[last:]))
    return "".join(pieces)
