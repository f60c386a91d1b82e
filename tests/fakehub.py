"""A small JupyterHub stand-in for tests: the OAuth and API endpoints trioproxy calls.

It is a real HTTP server (Quart-Trio under Hypercorn on loopback) implementing, as JupyterHub
does: ``GET /hub/api/oauth2/authorize`` (logs in ``login_as`` and redirects back with a
code), ``POST /hub/api/oauth2/token`` (code, client secret and PKCE verifier for a token),
``GET /hub/api/user`` (the token's user model with its scopes) and
``POST /hub/api/users/<name>/activity``, and ``GET /hub/api/`` (the Hub's version, also in an
``X-JupyterHub-Version`` header on every answer). Tests change its users, expire tokens, and read
what it was sent.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import trio
from quart import Response, jsonify, redirect, request
from quart_trio import QuartTrio

API_TOKEN = "hub-api-token-for-trioproxy-0123456789"
CLIENT_ID = "jupyterhub-user-alice"


def default_users() -> dict[str, list[str]]:
    return {
        "alice": ["access:servers!server=alice/", "access:servers!user=alice", "read:users:name!user=alice"],
        "bob": ["access:servers!user=bob", "access:servers!server=bob/"],
        "admin": ["access:servers", "admin:users"],
        "nobody": [],
    }


@dataclass
class FakeHub:
    api_token: str = API_TOKEN
    client_id: str = CLIENT_ID
    redirect_uri: str = ""  # the registered OAuth callback; set once the proxy's port is known
    login_as: str = "alice"
    version: str = "5.3.0"  # what the Hub announces (X-JupyterHub-Version on every answer, GET /hub/api/)
    version_header: bool = True
    users: dict[str, list[str]] = field(default_factory=default_users)
    groups: dict[str, list[str]] = field(default_factory=dict)  # user -> the groups they are in
    owner: str = "alice"  # whose server's token api_token is (its model is the owner's)
    activity_status: int = 200
    url: str = ""
    tokens: dict[str, str] = field(default_factory=dict)  # token -> user
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    user_requests: int = 0
    activity: list[dict[str, Any]] = field(default_factory=list)
    activity_auth: list[str] = field(default_factory=list)

    def issue_token(self, user: str) -> str:
        token = secrets.token_hex(16)
        self.tokens[token] = user
        return token

    def expire(self, token: str) -> None:
        self.tokens.pop(token, None)

    def app(self) -> QuartTrio:
        app = QuartTrio("fakehub")

        @app.after_request
        async def version_header(response: Response) -> Response:
            if self.version and self.version_header:
                response.headers["X-JupyterHub-Version"] = self.version
            return response

        @app.route("/hub/api/")
        async def root() -> Any:
            return jsonify({"version": self.version})

        @app.route("/hub/api/oauth2/authorize")
        async def authorize() -> Any:
            args = dict(request.args)
            self.authorize_requests.append(args)
            if args.get("client_id") != self.client_id or args.get("redirect_uri") != self.redirect_uri:
                return Response("unknown client or redirect_uri", status=400)
            if args.get("response_type") != "code":
                return Response("unsupported response_type", status=400)
            if "code_challenge" in args and args.get("code_challenge_method") != "S256":
                return Response("unsupported code_challenge_method", status=400)
            code = secrets.token_hex(8)
            self.codes[code] = {
                "user": self.login_as,
                "redirect_uri": args["redirect_uri"],
                "challenge": args.get("code_challenge", ""),
            }
            query = urlencode({"code": code, "state": args.get("state", "")})
            return redirect(f"{args['redirect_uri']}?{query}")

        @app.route("/hub/api/oauth2/token", methods=["POST"])
        async def token() -> Any:
            form = dict(await request.form)
            self.token_requests.append(form)
            grant = self.codes.pop(form.get("code", ""), None)  # codes are single-use
            valid = (
                grant is not None
                and form.get("client_id") == self.client_id
                and form.get("client_secret") == self.api_token
                and form.get("grant_type") == "authorization_code"
                and form.get("redirect_uri") == grant["redirect_uri"]
                and _pkce_ok(grant["challenge"], form.get("code_verifier", ""))
            )
            if not valid or grant is None:
                return jsonify({"error": "invalid_grant"}), 400
            return jsonify({"access_token": self.issue_token(grant["user"]), "token_type": "Bearer"})

        @app.route("/hub/api/user")
        async def user() -> Any:
            self.user_requests += 1
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            name = self.tokens.get(token.strip()) if scheme.lower() in ("token", "bearer") else None
            scopes = self.users.get(name, []) if name is not None else []
            if token.strip() == self.api_token and scheme.lower() in ("token", "bearer"):
                name = self.owner  # the server's own token (JupyterHub: its owner's model, groups included)
                scopes = [f"users:activity!user={name}", f"read:users:groups!user={name}"]
            if name is None:
                return jsonify({"status": 403, "message": "Missing or invalid credentials"}), 403
            return jsonify({"kind": "user", "name": name, "scopes": scopes, "groups": self.groups.get(name, [])})

        @app.route("/hub/api/users/<name>/activity", methods=["POST"])
        async def activity(name: str) -> Any:
            self.activity_auth.append(request.headers.get("Authorization", ""))
            if request.headers.get("Authorization") != f"token {self.api_token}":
                return jsonify({"status": 403}), 403
            if self.activity_status != 200:
                return jsonify({"status": self.activity_status}), self.activity_status
            self.activity.append({"user": name, **(await request.get_json())})
            return Response("", status=200)

        return app

    async def serve(
        self, *, ssl_files: dict[str, str] | None = None, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``started`` with the Hub's URL (``https`` with ``ssl_files``)."""
        import hypercorn.trio
        from hypercorn.config import Config

        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.graceful_timeout = 0.2
        if ssl_files:
            config.certfile = ssl_files["certfile"]
            config.keyfile = ssl_files["keyfile"]
            config.ca_certs = ssl_files["ca"]
            config.verify_mode = ssl.CERT_REQUIRED
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, self.app(), config)
            self.url = binds[0]
            task_status.started(self.url)


def _pkce_ok(challenge: str, verifier: str) -> bool:
    if not challenge:
        return True
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == challenge
