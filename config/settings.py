"""Rankwise settings: one file, read from the environment.

Every value a deployment may change comes from an environment variable through
the typed helpers in ``config.env``, which stop start-up with a message naming
the variable when a value is malformed. Production behaviour (HTTPS, secure
cookies, HSTS) follows from ``DEBUG`` being off; nothing lives in a second
settings file. The README lists every variable.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

from config.env import (
    env_bool,
    env_database,
    env_int,
    env_list,
    env_path,
    env_redis_url,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)

# --- where things are stored -------------------------------------------------
VAR_DIR = env_path("VAR_DIR", BASE_DIR / "var")
ARTIFACTS_DIR = env_path("ARTIFACTS_DIR", VAR_DIR / "artifacts")
UPLOADS_DIR = env_path("UPLOADS_DIR", VAR_DIR / "uploads")
MODELS_DIR = env_path("MODELS_DIR", VAR_DIR / "models")
# Uploads are read back only through views that check access by id, never by
# a URL path, so MEDIA_URL is deliberately left unset.
MEDIA_ROOT = UPLOADS_DIR

# --- secrets and hosts -------------------------------------------------------
if DEBUG:
    SECRET_KEY = env_str("SECRET_KEY", "django-insecure-debug-only-key-never-used-in-production")
else:
    SECRET_KEY = env_str("SECRET_KEY", "")
    if not SECRET_KEY:
        raise ImproperlyConfigured(
            "SECRET_KEY is required when DEBUG is off: set it to a long random string, e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`."
        )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS is required when DEBUG is off (comma-separated host names).")

CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
for _origin in CSRF_TRUSTED_ORIGINS:
    if not _origin.startswith(("http://", "https://")):
        raise ImproperlyConfigured(
            f"CSRF_TRUSTED_ORIGINS has {_origin!r}; each origin needs its scheme, e.g. https://rankwise.example.com."
        )

# --- applications ------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and Redoc as static files (the API docs pages)
    "annotation",
    "training",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # The language: the one a person picked (cookie), else the browser's.
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a lockout raised by the backend into a response.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "annotation.navigation.navigation",
            ],
        },
    },
]

# --- database ----------------------------------------------------------------
# SQLite is the embedded default for a first run; PostgreSQL is the production
# database and the one the concurrency tests use.
_database = env_database("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
if _database["ENGINE"] == "django.db.backends.sqlite3":
    Path(str(_database["NAME"])).parent.mkdir(parents=True, exist_ok=True)
    # config.sqlite_backend: writers of the web process are served first come, first served.
    _database["ENGINE"] = "config.sqlite_backend"
    _database["OPTIONS"] = {
        # Transactions take the write lock when they begin, so two claims
        # serialize instead of failing half-way with "database is locked".
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A thread keeps its connection between requests: opening one runs the pragmas above.
    _database["CONN_MAX_AGE"] = env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0)
    # A file, not :memory:, so a Celery worker started by a test sees the test database.
    _database["TEST"] = {"NAME": str(VAR_DIR / "test_db.sqlite3")}
else:
    _database["CONN_MAX_AGE"] = env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0)
    # A persistent connection that died (e.g. PostgreSQL restarted) is
    # replaced on the next request instead of failing it.
    _database["CONN_HEALTH_CHECKS"] = True
    _database.setdefault("OPTIONS", {})
    _database["OPTIONS"].setdefault("connect_timeout", env_int("DATABASE_CONNECT_TIMEOUT", 5, minimum=1))
DATABASES = {"default": _database}
SQLITE_FAIR_WRITES = env_bool("SQLITE_FAIR_WRITES", True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- accounts ----------------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# Login throttling (django-axes): after AXES_FAILURE_LIMIT failures for one
# username from one address, that pair is locked out for the cool-off time.
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = env_int("AXES_COOLOFF_MINUTES", 15, minimum=1) / 60  # hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429

# Mail carries password reset links to an account's owner (SECURITY.md,
# "Accounts"). Debug prints mail to the console; a deployment sets an SMTP
# relay. Links are valid for PASSWORD_RESET_TIMEOUT seconds (3 days).
EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.console.EmailBackend"
    if DEBUG
    else "django.core.mail.backends.smtp.EmailBackend",
)
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "rankwise@localhost")

# --- JSON API ----------------------------------------------------------------
# Programs authenticate with a token (`Authorization: Token …`); the pages'
# own scripts use the session and send the CSRF token. JSON only: the
# browsable API would need inline scripts the CSP forbids.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # Every error of every endpoint as RFC 9457 problem details (config/problems.py).
    "EXCEPTION_HANDLER": "config.problems.problem_exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Rankwise API",
    "DESCRIPTION": "Claim tasks, submit rankings, import prompts and read statistics.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The docs pages load Swagger UI and Redoc from our own static files, never a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Several models have a `kind`; each enum gets its own name in the schema.
    "ENUM_NAME_OVERRIDES": {
        "ProjectKindEnum": "annotation.models.Project.Kind",
        "TrainingRunKindEnum": "training.models.TrainingRun.Kind",
        # Every job kind shares one set of states (training.models.Job).
        "JobStatusEnum": "training.models.Job.Status",
    },
}

# --- security headers --------------------------------------------------------
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
# Load balancers probe the health check over plain HTTP inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
# The header alone changes nothing until the domain owner submits it to the
# browsers' preload list; on by default so the deploy check is clean.
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
if env_bool("SECURE_PROXY_SSL_HEADER", False):
    # Only behind a proxy that sets this header itself and strips it from clients.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Pages carry no inline script or style: everything comes from our own static
# files, and model outputs can never run code in a browser.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "frame-ancestors": [NONE],
        "form-action": [SELF],
    },
}

# --- internationalisation ----------------------------------------------------
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("ko", "한국어")]
# One catalog for the whole product (templates live outside the apps).
LOCALE_PATHS = [BASE_DIR / "annotation" / "locale"]
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

# --- static files ------------------------------------------------------------
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env_path("STATIC_ROOT", VAR_DIR / "static")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# --- Celery ------------------------------------------------------------------
# Redis is the broker. The database row of a job, not Celery's result
# backend, is the source of truth for its state; results are kept only for
# callers that wait on a short task.
REDIS_URL = env_redis_url("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_IGNORE_RESULT = True
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TIMEZONE = TIME_ZONE
CELERY_TASK_DEFAULT_QUEUE = "default"
# No routes by name: each task names its queue (`gpu` for the jobs that need a
# GPU, see training.tasks); everything else runs on the default queue.
# A worker reserves one message at a time: a GPU job waiting behind a long
# run on the same worker would otherwise sit idle while other GPUs are free.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TRACK_STARTED = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# Publishing must fail fast when Redis is down so the caller can say so,
# instead of hanging a web request on retries.
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}
# Periodic jobs, run by `celery -A config beat` (the demo embeds beat in its default worker).
CELERY_BEAT_SCHEDULE = {
    "expire-stale-leases": {"task": "annotation.tasks.assignments_expire_stale", "schedule": 60.0},
    "reap-stalled-training-runs": {"task": "training.tasks.training_runs_reap", "schedule": 60.0},
    "reap-stuck-dataset-builds": {"task": "training.tasks.dataset_builds_reap", "schedule": 300.0},
    "reap-stalled-generation-jobs": {"task": "training.tasks.stalled_generation_jobs_reap", "schedule": 60.0},
    "reap-stalled-scoring-jobs": {"task": "training.tasks.stalled_scoring_jobs_reap", "schedule": 60.0},
    "reap-stalled-judge-jobs": {"task": "training.tasks.stalled_judge_jobs_reap", "schedule": 60.0},
    "sweep-webhook-deliveries": {"task": "annotation.tasks.webhook_deliveries_sweep", "schedule": 60.0},
    "continuous-training": {"task": "training.tasks.continuous_training_tick", "schedule": 60.0},
}
# Outgoing webhooks (annotation.webhooks): a delivery's request timeout, its
# attempts, and the backoff between them (base × 2^(attempt − 1), capped);
# the sweep publishes again what the broker lost once it is this overdue.
WEBHOOK_TIMEOUT_S = env_int("WEBHOOK_TIMEOUT_S", 10, minimum=1)
WEBHOOK_MAX_ATTEMPTS = env_int("WEBHOOK_MAX_ATTEMPTS", 12, minimum=1)
WEBHOOK_RETRY_BASE_S = env_int("WEBHOOK_RETRY_BASE_S", 2, minimum=1)
WEBHOOK_RETRY_MAX_S = env_int("WEBHOOK_RETRY_MAX_S", 3600, minimum=1)
WEBHOOK_SWEEP_GRACE_S = env_int("WEBHOOK_SWEEP_GRACE_S", 300, minimum=1)
WEBHOOK_SWEEP_BATCH = env_int("WEBHOOK_SWEEP_BATCH", 500, minimum=1)
# Deliver webhooks to loopback, private and link-local addresses too: on for
# local receivers in development, off in production (the worker sits inside
# the network a manager's address could otherwise reach).
WEBHOOK_PRIVATE_ADDRESSES = env_bool("WEBHOOK_PRIVATE_ADDRESSES", DEBUG)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# Hard limit for a GPU job; the soft limit leaves time to save a checkpoint.
TRAINING_TIME_LIMIT_S = env_int("TRAINING_TIME_LIMIT_S", 6 * 3600, minimum=60)
TRAINING_SOFT_TIME_LIMIT_S = TRAINING_TIME_LIMIT_S - min(600, TRAINING_TIME_LIMIT_S // 10)
TRAINING_MAX_ATTEMPTS = env_int("TRAINING_MAX_ATTEMPTS", 3, minimum=1)
# Hard limit of one dataset build; a build still running after it is reaped as failed.
DATASET_BUILD_TIME_LIMIT_S = env_int("DATASET_BUILD_TIME_LIMIT_S", 2 * 3600, minimum=60)
# A running run whose process wrote no heartbeat for this long is taken as dead
# (its process heartbeats every few seconds while training).
TRAINING_HEARTBEAT_TIMEOUT_S = env_int("TRAINING_HEARTBEAT_TIMEOUT_S", 300, minimum=10)
# The GPUs this worker owns (`RANKWISE_GPUS=0,1`; none: its jobs run on CPUs
# and see no card). Jobs take them through locks in GPU_LOCK_DIR, which must
# be local to the host (never shared storage), see training.placement.
WORKER_GPUS = env_list("RANKWISE_GPUS", [])
for _device in WORKER_GPUS:
    if not re.match(r"^(\d+|(GPU|MIG)-[0-9A-Za-z-]+)$", _device):
        raise ImproperlyConfigured(
            f"RANKWISE_GPUS: {_device!r} is not a GPU index (0, 1, …) nor a GPU-/MIG- UUID."
        )
if len(set(WORKER_GPUS)) != len(WORKER_GPUS):
    raise ImproperlyConfigured(f"RANKWISE_GPUS={','.join(WORKER_GPUS)!r} names a device twice.")
GPU_LOCK_DIR = env_path("GPU_LOCK_DIR", Path(tempfile.gettempdir()) / "rankwise-gpus")
# The most GPUs a run may ask for: the number of cards each GPU worker owns
# (a run asking for more would find no worker to take it).
TRAINING_MAX_GPUS = env_int("TRAINING_MAX_GPUS", 8, minimum=1)
# With acks_late, Redis re-delivers an unacknowledged message after the
# visibility timeout. It must exceed the longest task, or a running job would
# be delivered a second time while the first is still at work.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": TRAINING_TIME_LIMIT_S + 3600,
    "socket_connect_timeout": 2,
    "socket_timeout": 10,
}
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2, "socket_timeout": 10}

# --- logging -----------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # django-axes announces its configuration at every start; keep commands quiet.
    "loggers": {"axes.apps": {"level": "WARNING"}},
}
