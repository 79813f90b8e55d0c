"""The web dashboard that ``corral server`` serves: server-rendered pages (Jinja2), htmx for
the parts that refresh, uPlot for the plots (both shipped in ``static/``, no build step), live
through a server-sent-events relay of the event stream.

It holds no state of its own: every page is
made from the API's own answers (:mod:`.internal`), every action is the API's route, and the
guard (:mod:`corral.control.http.guard`) authenticates its requests by session cookie
(:mod:`.sessions`) with the rules of :mod:`corral.control.http.access`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import sessionmaker

from corral.control.dashboard.sessions import Sessions, derive_key
from corral.control.db import ApiToken
from corral.control.tokens import TokenStore


def named_lookup(db: sessionmaker[DbSession]) -> Callable[[str], tuple[str, str] | None]:
    """(key id, role) of the stored token ``name``, or None: what a session is checked
    against on every request."""

    def named(name: str) -> tuple[str, str] | None:
        with db() as s:
            row = s.get(ApiToken, name)
            return None if row is None else (row.key_id, row.role)

    return named


def install(app: FastAPI, *, token: str, tokens: TokenStore) -> Sessions:
    """Add the dashboard's routes to ``app`` and let its guard accept session cookies."""
    from corral.control.dashboard import routes

    sessions = Sessions(derive_key(token), token, tokens.resolve, named_lookup(tokens.sessions))
    app.state.session_auth = sessions
    app.include_router(routes.router(sessions, token))
    return sessions

