"""Corral: a self-service VM orchestrator. ``create_app`` builds the portal."""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, render_template, request
from sqlalchemy import event
from werkzeug.middleware.proxy_fix import ProxyFix

from . import config as config_mod
from .extensions import csrf, db, htmx, login_manager, migrate, queues

MIGRATIONS = str(Path(__file__).with_name("migrations"))


def create_app(test_config: dict | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    instance = Path(os.environ.get("CORRAL_INSTANCE_PATH", app.instance_path))
    app.instance_path = str(instance)
    instance.mkdir(parents=True, exist_ok=True)

    app.config.from_object(config_mod.Defaults)
    app.config.from_pyfile("config.py", silent=True)
    app.config.update(config_mod.env_overrides())
    if test_config:
        app.config.update(test_config)
    if not app.config.get("SQLALCHEMY_DATABASE_URI"):
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{instance / 'corral.sqlite'}"
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = config_mod.secret_key(instance)
    _engine_options(app)
    _proxy_fix(app)

    db.init_app(app)
    with app.app_context():
        _sqlite_pragmas(db.engine)
    migrate.init_app(app, db, directory=MIGRATIONS, render_as_batch=True)
    login_manager.init_app(app)
    csrf.init_app(app)
    htmx.init_app(app)
    queues.init_app(app)

    from . import auth_core, cli, metering, views_common
    from .blueprints import api, auth, backups, library, moves, servers, summary, tasks, users, vms
    from .blueprints import metering as metering_bp, offerings as offerings_bp, rebalance as rebalance_bp

    auth_core.init_app(app)
    metering.init_app(app)
    views_common.init_app(app)
    for bp in (auth.bp, summary.bp, servers.bp, vms.bp, moves.bp, backups.bp, library.bp, users.bp, tasks.bp, api.bp):
        app.register_blueprint(bp)
    app.register_blueprint(metering_bp.bp)
    from .blueprints import livesync as livesync_bp
    app.register_blueprint(livesync_bp.bp)
    app.register_blueprint(offerings_bp.bp)
    app.register_blueprint(rebalance_bp.bp)
    from .blueprints import networks as networks_bp
    app.register_blueprint(networks_bp.bp)
    from .blueprints import clusters as clusters_bp
    app.register_blueprint(clusters_bp.bp)
    from .blueprints import license_keys as license_keys_bp
    app.register_blueprint(license_keys_bp.bp)
    from .blueprints import attributes as attributes_bp
    app.register_blueprint(attributes_bp.bp)
    from .blueprints import console as console_bp
    app.register_blueprint(console_bp.bp)
    from . import api as api_v1
    api_v1.init_app(app)
    from . import metrics
    app.register_blueprint(metrics.bp)
    cli.init_app(app)

    @app.errorhandler(404)
    def not_found(e):
        if request.path.startswith("/api/v1/"):  # no route matched: still the API's JSON error
            return api_v1.json_error(e)
        return render_template("error.html", code=404, message="That page or object does not exist."), 404

    @app.errorhandler(403)
    def forbidden(e):
        return render_template("error.html", code=403, message="You are not allowed to do that."), 403

    @app.errorhandler(500)
    def server_error(e):
        return render_template("error.html", code=500, message="Something went wrong on our side; it has been logged."), 500

    return app


def _proxy_fix(app: Flask) -> None:
    """Believe X-Forwarded-* only from as many proxies as the settings name (none by default)."""
    hops = {key: int(app.config.get(f"PROXY_FIX_X_{key.upper()}") or 0)
            for key in ("for", "proto", "host", "prefix")}
    if any(hops.values()):
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops["for"], x_proto=hops["proto"], x_host=hops["host"],
                                x_prefix=hops["prefix"])


def _sqlite_pragmas(engine) -> None:
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


def _engine_options(app: Flask) -> None:
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    opts = dict(app.config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    if uri.startswith("sqlite"):
        # Several web threads and a worker share the file: wait for locks
        # rather than failing, and use WAL so readers never block writers.
        opts.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
    else:
        opts.setdefault("pool_pre_ping", True)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = opts
