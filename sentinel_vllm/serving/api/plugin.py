"""vLLM's plugin entry points on the API side: the sentinel in plain ``vllm serve``.

With sentinel-vllm installed::

    VLLM_PLUGINS=sentinel vllm serve MODEL --additional-config '{"sentinel": {"file": "default"}}'

(or ``python -m vllm.entrypoints.openai.api_server --model MODEL ...``, what vLLM's
images run) serves with the sentinel. Three entry points, one name (``sentinel``):

* ``vllm.endpoint_plugins`` -> :class:`SentinelEndpointPlugin`. vLLM loads endpoint
  plugins only when ``VLLM_PLUGINS`` names them
  (``vllm/plugins/__init__.py``: ``load_endpoint_plugins``) and calls
  ``attach_router(app)`` in ``build_app`` after its own routers
  (``vllm/entrypoints/launchers/app.py``). With the ``"sentinel"`` key in
  ``app.state.args.additional_config`` it validates the settings (a bad one stops
  the server with a clear message) and adds
  :class:`~sentinel_vllm.serving.api.middleware.SentinelMiddleware` to the app,
  which then answers ``/sentinel/stats`` and ``/sentinel/labels`` and adds the
  blocks; without the key it adds nothing.
* ``vllm.general_plugins`` -> :func:`name_run`: loaded in every vLLM process, first
  in the one that parses the arguments, before it starts API servers or engines; it
  names the run's folder (``$SENTINEL_VLLM_RUN``, nothing is created) so that
  several API servers share one audit store.
* ``vllm.logits_processors`` -> the worker side
  (:mod:`sentinel_vllm.serving.worker.plugin`).

Settings are the ``sentinel-vllm serve`` options as keys of the ``"sentinel"``
object (:mod:`~sentinel_vllm.serving.api.settings`), plus the worker's
(:data:`~sentinel_vllm.serving.contract.WORKER_SETTINGS`). See docs/serving.md.
"""

from __future__ import annotations

import logging
import os

from sentinel_vllm.serving.contract import (
    ADDITIONAL_CONFIG_KEY,
    DEFAULT_SERIES,
    MIDDLEWARE,
    PLUGIN_NAME,
    RUN_ENV,
    SERIES_ENV,
    sentinel_settings,
)

__all__ = ["SentinelEndpointPlugin", "check_worker_series", "name_run", "run_audit_db"]

log = logging.getLogger("sentinel_vllm.serving")


def name_run() -> None:
    """``vllm.general_plugins`` entry: name this run's folder in ``$SENTINEL_VLLM_RUN``.

    The first vLLM process sets it (a path under the temporary folder, not created);
    the processes it starts inherit it. The folder is made only when an API server
    needs the shared audit store, and removed when the naming process exits.
    """
    if os.environ.get(RUN_ENV):
        return
    import atexit
    import secrets
    import shutil
    import tempfile

    owner = os.getpid()
    folder = os.path.join(tempfile.gettempdir(), f"sentinel-vllm-{owner}-{secrets.token_hex(4)}")
    os.environ[RUN_ENV] = folder

    def cleanup():  # in the naming process only, not in a forked child that runs atexit
        if os.getpid() == owner:
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(cleanup)


def run_audit_db(settings: dict) -> dict:
    """``settings`` with ``audit_db`` in the run's folder unless the user chose one.

    Without ``$SENTINEL_VLLM_RUN`` (the general plugin not loaded) the store stays
    per process, in memory.
    """
    if settings.get("audit_db") or settings.get("audit-db") or not os.environ.get(RUN_ENV):
        return settings
    folder = os.environ[RUN_ENV]
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return {**settings, "audit_db": os.path.join(folder, "audit.sqlite")}


def check_worker_series(needed, settings: dict, environ=None) -> None:
    """Refuse a sentinel whose series the worker will not record.

    The worker records ``settings["series"]``, else ``$SENTINEL_SERIES``, else
    ``full,top20`` (:func:`~sentinel_vllm.serving.worker.tracker_setup.tracker_config`).

    Raises
    ------
    ValueError
        Naming the ``"series"`` value that would record them.
    """
    from sentinel_vllm.series import split_series

    env = os.environ if environ is None else environ
    chosen = settings.get("series") or env.get(SERIES_ENV)
    have = list(split_series(chosen)) if chosen else list(DEFAULT_SERIES)
    missing = [s for s in needed if s not in have]
    if missing:
        raise ValueError(
            f"the sentinel scores series {', '.join(missing)}, which the worker does not record "
            f"({','.join(have)}): add \"series\": \"{','.join(have + missing)}\" to the "
            f'"{ADDITIONAL_CONFIG_KEY}" object of --additional-config')


class SentinelEndpointPlugin:
    """``vllm.endpoint_plugins`` entry: the sentinel's response layer on vLLM's OpenAI app.

    Attributes
    ----------
    config : ServerConfig or None
        The settings in use; None while the sentinel is off in this server.
    """

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self):
        self.config = None

    def attach_router(self, app) -> None:
        """Add the middleware when ``--additional-config`` has the ``"sentinel"`` key.

        Raises
        ------
        ValueError
            A malformed or unusable setting (vLLM does not start).
        """
        args = getattr(app.state, "args", None)
        settings = sentinel_settings(getattr(args, "additional_config", None))
        if settings is None:
            return
        if MIDDLEWARE in (getattr(args, "middleware", None) or ()):
            log.info("sentinel: the middleware is already given with --middleware")
            return
        from sentinel_vllm.serving.api.middleware import SentinelMiddleware
        from sentinel_vllm.serving.api.settings import config_from_settings

        config, scorer = config_from_settings(run_audit_db(settings))
        check_worker_series(scorer.needed_series, settings)
        app.add_middleware(SentinelMiddleware, config=config)
        self.config = config
        log.info("sentinel: %s on this API server (audit store %s)", scorer.id,
                 config.audit_db or "in memory")

    async def init_state(self, engine_client, state, args) -> None:
        """Nothing: the middleware builds its state on the first request."""
        return
