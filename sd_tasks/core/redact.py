"""Credentials out of anything shown: a URL's password (or an http user that is a token, as in
https://TOKEN@github.com/...) and signed or token query parameters become `***` wherever a URL or an argv is logged,
tagged, written to a result or put in an error line.

Standard library only, and the same file as plugins/dreamline/redact.py (a test keeps them equal): the Airflow
image has no sd_tasks, the worker image no plugins.
"""
from __future__ import annotations

import re

MASK = "***"
# scheme://user[:password]@ ; the user alone is a credential for http(s) (a token as user), not for ssh or git
_USERINFO = re.compile(r"\b(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<user>[^/?#@:\s'\"]*)"
                       r"(?::(?P<password>[^/?#@\s'\"]*))?@")
_QUERY = re.compile(r"(?i)(?P<name>[?&;](?:[\w.-]*token|[\w.-]*signature|[\w.-]*secret|x-amz-credential|sig|"
                    r"password|passwd|pwd|api[_-]?key|apikey|key|auth|authorization|credential)=)"
                    r"(?P<value>[^&#\s'\"]+)")


def redact(text: str) -> str:
    """`text` with every credential of every URL in it replaced by ***."""
    def userinfo(m: re.Match) -> str:
        if m["password"] is not None:
            return f"{m['scheme']}://{m['user']}:{MASK}@" if m["password"] else m[0]
        if m["scheme"].lower() in ("http", "https") and m["user"]:
            return f"{m['scheme']}://{MASK}@"
        return m[0]

    return _QUERY.sub(lambda m: m["name"] + MASK, _USERINFO.sub(userinfo, str(text)))


def secrets_in(text: str) -> list[str]:
    """The credentials `redact` hides in `text`, each once, in order (to register them with a log masker)."""
    found = []
    for m in _USERINFO.finditer(str(text)):
        if m["password"]:
            found.append((m.start("password"), m["password"]))
        elif m["password"] is None and m["scheme"].lower() in ("http", "https") and m["user"]:
            found.append((m.start("user"), m["user"]))
    found += [(m.start("value"), m["value"]) for m in _QUERY.finditer(str(text))]
    return list(dict.fromkeys(value for _, value in sorted(found)))
