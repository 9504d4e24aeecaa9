"""``malerei serve``, ``malerei worker`` and the admin commands ``users``, ``keys``, ``credits``.

Every command takes the same ``--data-dir`` (default: ``$MALEREI_DATA_DIR`` or the user data
dir), which holds the SQLite database, the images and the server's secret, and the same
``--database-url`` (default ``$MALEREI_DATABASE_URL``; e.g. ``postgresql://u:p@host/malerei``
instead of the SQLite file). ``serve`` and ``worker`` take ``--queue`` (default
``$MALEREI_QUEUE``: ``sql``, or ``redis://host:6379/0`` for the Redis-backed queue).

    malerei users add alice --admin --password-stdin <<< 'correct horse'
    malerei credits add alice 1000
    malerei keys create alice            # prints the key once, as the last word
    malerei serve --port 7860            # 127.0.0.1 only, authentication on
    malerei worker                       # optional extra worker process on the same data dir
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def default_data_dir() -> Path:
    env = os.environ.get("MALEREI_DATA_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("malerei")) / "serve"


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="database, images and secrets (default: $MALEREI_DATA_DIR or the user data dir)")
    parser.add_argument("--database-url", default=os.environ.get("MALEREI_DATABASE_URL") or None, metavar="URL",
                        help="SQLAlchemy URL of the database, e.g. postgresql://user:password@host/malerei "
                             "(default: $MALEREI_DATABASE_URL, else the SQLite file <data dir>/malerei.db)")


def _common_server_args(parser: argparse.ArgumentParser) -> None:
    _data_dir_arg(parser)
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="folder with user models (default: <data dir>/models)")
    parser.add_argument("--default-model", default=None,
                        help="model for jobs that name none (default: the built-in model)")
    parser.add_argument("--queue", default=os.environ.get("MALEREI_QUEUE") or None, metavar="URL",
                        help="job queue: 'sql' (the database; the default) or a Redis URL such as "
                             "redis://host:6379/0, which also shares the rate limits between API servers "
                             "(default: $MALEREI_QUEUE)")
    parser.add_argument("--lease-seconds", type=float, default=15.0,
                        help="a worker silent this long is taken for dead and its jobs run again")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a service setting (see malerei/serve/config.py), e.g. "
                             "--set max_queued_per_user=4 --set rate_limit_per_minute=60")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (FastAPI under uvicorn)",
                       description="Run the service. Binds 127.0.0.1 by default; any other address "
                                   "requires authentication (on unless --no-auth).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    _common_server_args(p)
    p.add_argument("--no-auth", action="store_true",
                   help="single local user, no credentials (only allowed on a loopback address)")
    p.add_argument("--no-worker", action="store_true",
                   help="do not run a worker in this process (run `malerei worker` instead)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a job worker process on a data dir")
    _common_server_args(p)
    p.set_defaults(func=cmd_worker)

    users = sub.add_parser("users", help="manage service users").add_subparsers(dest="users_cmd", required=True)
    p = users.add_parser("add", help="create a user")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="give the admin role")
    p.add_argument("--password-stdin", action="store_true", help="read a password (for web login) from stdin")
    _data_dir_arg(p)
    p.set_defaults(func=cmd_users_add)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_cmd", required=True)
    p = keys.add_parser("create", help="create an API key for USER (printed once, as the last word)")
    p.add_argument("user")
    p.add_argument("--name", default="", help="a label for the key")
    _data_dir_arg(p)
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("revoke", help="revoke an API key by its id")
    p.add_argument("key_id")
    _data_dir_arg(p)
    p.set_defaults(func=cmd_keys_revoke)

    credits = sub.add_parser("credits", help="manage credits").add_subparsers(dest="credits_cmd", required=True)
    p = credits.add_parser("add", help="add N credits to USER (negative N removes)")
    p.add_argument("user")
    p.add_argument("amount", type=int)
    _data_dir_arg(p)
    p.set_defaults(func=cmd_credits_add)


# ----------------------------------------------------------------------------- helpers
def _settings(args: argparse.Namespace, **extra):  # noqa: ANN202 - Settings
    from malerei.serve.config import Settings, parse_overrides

    if getattr(args, "database_url", None):
        extra["database_url"] = args.database_url
    if getattr(args, "queue", None):
        extra["queue_url"] = args.queue
    extra.update(parse_overrides(getattr(args, "set", None) or []))
    return Settings(data_dir=args.data_dir or default_data_dir(), **extra)


def _services(args: argparse.Namespace):  # noqa: ANN202 - Services
    from malerei.serve.context import build_services

    return build_services(_settings(args))


def _where(settings) -> str:  # noqa: ANN001 - Settings
    """Data dir, database and queue, without passwords."""
    from sqlalchemy.engine import make_url

    from malerei.serve.jobs.redis_queue import redact

    queue = redact(settings.redis_url) if settings.redis_url else "sql"
    database = make_url(settings.db_url).render_as_string(hide_password=True)
    return f"data: {settings.data_dir}, database: {database}, queue: {queue}"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> int:
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    settings = _settings(args, host=args.host, port=args.port, auth=not args.no_auth,
                         in_process_worker=not args.no_worker, models_dir=args.models_dir,
                         default_model=args.default_model, lease_s=args.lease_seconds)
    settings.check()  # ConfigError: "error: <why>", exit 2
    _logging(args.log_level)
    import uvicorn

    from malerei.serve.app import create_app

    app = create_app(settings)
    print(f"malerei serving on http://{settings.host}:{settings.port} ({_where(settings)})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from malerei.engine.offline import enforce_offline
    from malerei.serve.app import make_engine
    from malerei.serve.context import build_services
    from malerei.serve.jobs.worker import Worker

    enforce_offline()
    _logging(args.log_level)
    settings = _settings(args, models_dir=args.models_dir, default_model=args.default_model,
                         lease_s=args.lease_seconds)
    worker = Worker(build_services(settings), make_engine(settings))
    done = threading.Event()

    def _stop(*_: object) -> None:
        done.set()
        worker.stop(timeout=0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"malerei worker {worker.worker_id} ({_where(settings)})", flush=True)
    worker.run_forever()
    return 0


def cmd_users_add(args: argparse.Namespace) -> int:
    from malerei.serve.accounts.users import UserError, create_user

    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    services = _services(args)
    try:
        with services.db.write() as session:
            user = create_user(session, args.name, password=password, is_admin=args.admin)
    except (UserError, ValueError) as exc:
        return _fail(str(exc))
    print(f"created user {user.name}{' (admin)' if user.is_admin else ''}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from malerei.serve.accounts.keys import create_key
    from malerei.serve.accounts.users import UserError, get_user

    services = _services(args)
    try:
        with services.db.write() as session:
            row, token = create_key(session, get_user(session, args.user), name=args.name)
    except UserError as exc:
        return _fail(str(exc))
    print(f"key id {row.id} for {args.user}; it is shown only now: {token}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from malerei.serve.accounts.keys import revoke_key

    services = _services(args)
    with services.db.write() as session:
        if not revoke_key(session, args.key_id):
            return _fail(f"no API key with id {args.key_id!r}")
    print(f"revoked key {args.key_id}")
    return 0


def cmd_credits_add(args: argparse.Namespace) -> int:
    from malerei.serve import credits
    from malerei.serve.accounts.users import UserError, get_user

    services = _services(args)
    try:
        with services.db.write() as session:
            balance = credits.grant(session, get_user(session, args.user), args.amount, note="malerei credits add")
    except UserError as exc:
        return _fail(str(exc))
    print(f"{args.user}: {args.amount:+d} credits, balance {balance}")
    return 0
