"""vLLM general plugin: runs in every vLLM process, possibly more than once.

It wraps three ``EngineArgs`` methods (see ``vllm.args``), vLLM's stat
logger manager (see ``vllm.metrics``) and its input processor's parameter
check (see ``vllm.request_options``), and adds one ASGI middleware to the app
of ``vllm serve``, inside its authentication; the scheduler, worker and attention
backend are named in the engine config and loaded by vLLM itself where they
run. Registration is idempotent.
"""

from __future__ import annotations

import functools
import sys

_MARK = "_kvcompress_wrapped"


def register() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, _MARK, False):
        return
    from vllm_kvcompress.vllm import args

    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__
    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(add_cli_args)
    def _add_cli_args(parser, *a, **kw):
        return args.add_cli_args(add_cli_args(parser, *a, **kw))

    @functools.wraps(from_cli_args)
    def _from_cli_args(cls, parsed, *a, **kw):
        engine_args = from_cli_args(cls, parsed, *a, **kw)
        if hasattr(parsed, "middleware"):  # the flags of `vllm serve`, which builds an app
            _wrap_app_middleware()
        config = args.config_from_args(parsed)
        if config is not None:
            engine_args.additional_config = args.with_config(engine_args.additional_config, config)
        return engine_args

    @functools.wraps(create_engine_config)
    def _create_engine_config(self, *a, **kw):
        config = args.prepare_engine_args(self)
        vllm_config = create_engine_config(self, *a, **kw)
        args.finish_vllm_config(vllm_config, config)
        return vllm_config

    for fn in (_add_cli_args, _from_cli_args, _create_engine_config):
        setattr(fn, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(_add_cli_args)
    EngineArgs.from_cli_args = classmethod(_from_cli_args)
    EngineArgs.create_engine_config = _create_engine_config
    _wrap_stat_loggers()
    _wrap_param_check()
    if _LAUNCHER in sys.modules:  # an API server process, whichever way it started
        _wrap_app_middleware()


_LAUNCHER = "vllm.entrypoints.launchers.app"


def _wrap_app_middleware() -> None:
    """Our request-option middleware in the app ``vllm serve`` builds, inside
    authentication and CORS, when compression is on.

    vLLM (0.32) adds CORS, then ``--api-key`` authentication, then each ``--middleware``
    entry with Starlette's ``add_middleware``, which puts each outside the ones before:
    a ``--middleware`` entry would read bodies of unauthenticated clients. Appended after
    them, ours is innermost: it sees only authenticated requests, and its answers get
    CORS headers.
    """
    import importlib

    launcher = importlib.import_module(_LAUNCHER)
    init = launcher.init_entrypoints_middleware
    if getattr(init, _MARK, False):
        return

    @functools.wraps(init)
    def _init(parsed, app, *a, **kw):
        init(parsed, app, *a, **kw)
        if _serves_compressed(parsed):
            from starlette.middleware import Middleware

            from vllm_kvcompress.vllm.request_options import KVRequestOptions

            app.user_middleware.append(Middleware(KVRequestOptions))

    setattr(_init, _MARK, True)
    launcher.init_entrypoints_middleware = _init


def _serves_compressed(parsed) -> bool:
    """Whether these ``vllm serve`` flags turn compression on (``--kv-*`` or
    ``--additional-config``); without it the HTTP path stays vLLM's own."""
    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.vllm import args

    try:
        config = args.config_from_args(parsed) or KVCompressConfig.from_additional_config(
            getattr(parsed, "additional_config", None))
    except (ValueError, TypeError, SystemExit):  # reported by the engine's own config step
        return False
    return config.enabled


def _wrap_param_check() -> None:
    """Requests' kv_policy / kv_budget checked where vLLM checks sampling parameters."""
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_kvcompress.vllm.request_options import check_params

    validate = InputProcessor._validate_params

    @functools.wraps(validate)
    def _validate_params(self, params, *a, **kw):
        result = validate(self, params, *a, **kw)
        check_params(self.vllm_config, params)
        return result

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params


def _wrap_stat_loggers() -> None:
    """Frontends with compression on get our logger first, online and offline alike.

    It must run before vLLM's own loggers: it removes our payload from
    ``kv_connector_stats``, where vLLM's logging logger would choke on it.
    """
    from vllm.v1.metrics.loggers import StatLoggerManager

    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.vllm.metrics import KVCompressStatLogger

    init = StatLoggerManager.__init__

    @functools.wraps(init)
    def _init(self, vllm_config, *a, custom_stat_loggers=None, **kw):
        if KVCompressConfig.from_additional_config(vllm_config.additional_config).enabled:
            custom_stat_loggers = [KVCompressStatLogger, *(custom_stat_loggers or [])]
        init(self, vllm_config, *a, custom_stat_loggers=custom_stat_loggers, **kw)

    setattr(_init, _MARK, True)
    StatLoggerManager.__init__ = _init
