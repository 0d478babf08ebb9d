"""Flask extensions, created unbound; ``create_app`` initialises them.

Nothing here connects to anything at import time: the Redis client is made
lazily on first use and cached per application.
"""

from __future__ import annotations

import redis
from flask import Flask, current_app
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from flask_wtf import CSRFProtect
from htmx_flask import Htmx
from rq import Queue
from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

# Stable constraint names so Alembic migrations (and SQLite batch mode) can
# refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
login_manager = LoginManager()
csrf = CSRFProtect()
htmx = Htmx()


class Queues:
    """The Redis connection and RQ queues of one application."""

    def init_app(self, app: Flask) -> None:
        app.extensions["corral_queues"] = {"redis": None}

    @property
    def redis(self) -> redis.Redis:
        state = current_app.extensions["corral_queues"]
        if state["redis"] is None:
            state["redis"] = redis.Redis.from_url(
                current_app.config["REDIS_URL"],
                socket_connect_timeout=3,
                socket_timeout=10,
                health_check_interval=30,
            )
        return state["redis"]

    def name(self) -> str:
        """Corral's one queue: every worker reads it (per-server queues come when a job needs them)."""
        return f"{current_app.config['QUEUE_PREFIX']}-default"

    def queue(self) -> Queue:
        return Queue(self.name(), connection=self.redis)

    def all_names(self) -> list[str]:
        return [self.name()]


queues = Queues()
