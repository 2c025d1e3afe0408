"""Consent records: who agreed that a subject's photos may be used, for what, and until when.

A record is `<path>.consent.json` at the data registry's root, beside `<path>.dvc`: tracked by Git, so it is
versioned with the dataset (the version a run trains on names the record that covered it) and it is not one of the
photos. `publish-dataset --consent FILE` adds it with a version. It holds a reference to the signed form, never the
form itself:

    {"id": "consent-2026-014", "given_by": "Jane Doe", "given_at": "2026-11-02", "expires": "2027-11-02",
     "scope": ["training", "serving"], "form": "dms://legal/consent/2026-014"}

A subject of kind person trains only with a record that covers training today (`dataset --consent required`); for
any subject, a record that no longer covers training stops training, and a registered version whose record does not
cover serving today is not served (its tags carry the record: `consent.id`, `consent.expires`, `consent.scope`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date

from sd_tasks.core.errors import StepError

USES = ("training", "serving")
FIELDS = {"id", "given_by", "given_at", "expires", "scope", "form"}


@dataclass(frozen=True)
class Consent:
    id: str
    given_by: str
    given_at: date
    expires: date
    scope: tuple[str, ...]
    form: str

    def tags(self) -> dict[str, str]:
        """What a registered version and an MLflow run carry of it (no name of the person)."""
        return {"consent.id": self.id, "consent.expires": self.expires.isoformat(),
                "consent.scope": ",".join(self.scope)}


def record_name(path: str) -> str:
    """The record of the subject folder `path` in the data registry."""
    return f"{path.strip('/')}.consent.json"


def parse(text: str, shown: str) -> Consent:
    """The record in `text` (JSON), or one line naming `shown` and what is wrong with it."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StepError(f"{shown}: not JSON ({exc})") from None
    if not isinstance(data, dict) or set(data) != FIELDS:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise StepError(f"{shown}: a consent record has exactly {', '.join(sorted(FIELDS))} (got {got})")
    for key in ("id", "given_by", "form"):
        if not isinstance(data[key], str) or not data[key].strip() or len(data[key]) > 500:
            raise StepError(f"{shown}: {key} must be a non-empty text")
    days = {}
    for key in ("given_at", "expires"):
        try:
            days[key] = date.fromisoformat(data[key])
        except (TypeError, ValueError):
            raise StepError(f"{shown}: {key} {data[key]!r} is not a date (YYYY-MM-DD)") from None
    if days["expires"] <= days["given_at"]:
        raise StepError(f"{shown}: expires {days['expires']} is not after given_at {days['given_at']}")
    scope = data["scope"]
    if not isinstance(scope, list) or not scope or not set(scope) <= set(USES) or len(set(scope)) != len(scope):
        raise StepError(f"{shown}: scope {scope!r} must list some of {', '.join(USES)}, each once")
    return Consent(data["id"].strip(), data["given_by"].strip(), days["given_at"], days["expires"],
                   tuple(u for u in USES if u in scope), data["form"].strip())


def refusal(consent: Consent, use: str, today: date) -> str | None:
    """Why `consent` does not cover `use` today, or None when it does."""
    return _not_covered(consent.id, consent.scope, consent.given_at, consent.expires, use, today)


def tags_refusal(tags: dict[str, str], use: str, today: date) -> str | None:
    """Why a registered version's consent tags (Consent.tags) do not cover `use` today (None: they do, or it has
    none)."""
    if "consent.id" not in tags:
        return None
    scope = tuple(u for u in tags.get("consent.scope", "").split(",") if u)
    try:
        expires = date.fromisoformat(tags.get("consent.expires", ""))
    except ValueError:  # a tag edited by hand: no date, no serving
        return f"consent {tags['consent.id']}: its expires tag {tags.get('consent.expires')!r} is not a date"
    return _not_covered(tags["consent.id"], scope, None, expires, use, today)


def _not_covered(consent_id: str, scope: tuple[str, ...], given_at: date | None, expires: date, use: str,
                 today: date) -> str | None:
    if use not in scope:
        return f"consent {consent_id} covers {', '.join(scope) or 'nothing'}, not {use}"
    if given_at is not None and today < given_at:
        return f"consent {consent_id} is given from {given_at}"
    if today >= expires:
        return f"consent {consent_id} expired on {expires}"
    return None
