"""deploy_timing's probe (its sitecustomize): timestamps of every flwr-clientapp / flwr-serverapp process and of each
request a site worker serves, appended as JSON lines."""
import atexit, json, os, sys, time
_LOG = os.environ.get("FEDTL_TIMING_LOG")
_ROLE = os.path.basename(sys.argv[0]) if sys.argv else ""
if "fedtl.federation.worker" in getattr(sys, "orig_argv", ()):
    _ROLE = "site-worker"
if _LOG and _ROLE in ("flwr-clientapp", "flwr-serverapp", "site-worker"):
    import importlib.abc, importlib.machinery
    _marks = {"role": _ROLE, "pid": os.getpid(), "rounds": {}}
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            btime = next(int(l.split()[1]) for l in fh if l.startswith("btime"))
        _marks["start"] = btime + ticks / os.sysconf("SC_CLK_TCK")
    except Exception:
        _marks["start"] = time.time()

    def _mark(key, value=None):
        _marks.setdefault(key, value if value is not None else time.time())

    def _wrap_clientapp(module):
        original = module.ClientApp.__call__
        def __call__(self, message, context):
            _mark("call")
            try:
                _marks["type"] = str(message.metadata.message_type)
                _marks["round"] = int(message.content["config"].get("server-round", 0)) if "config" in message.content else 0
                _marks["site"] = str(context.node_config.get("site-config", ""))
            except Exception:
                pass
            try:
                return original(self, message, context)
            finally:
                _mark("return")
                _marks["imported"] = sorted(m for m in ("timm", "torchvision.models", "peft", "sklearn", "opacus",
                                                        "torch") if m in sys.modules)
        module.ClientApp.__call__ = __call__

    _request = {}  # the site worker's request being served (one at a time)

    def _wrap_training(module):
        original = module._run_epochs
        def _run_epochs(*args, **kwargs):
            target = _request if _ROLE == "site-worker" else _marks
            target.setdefault("first_step", time.time())
            try:
                return original(*args, **kwargs)
            finally:
                target.setdefault("train_end", time.time())
        module._run_epochs = _run_epochs

    def _wrap_handlers(module):  # the site worker: one JSON line per request, written when it is served
        if _ROLE != "site-worker":  # a ClientApp serving in process is timed by _marks
            return
        def wrap(name, kind):
            original = getattr(module, name)
            def handler(content, run_config, node_config, *args, **kwargs):
                _request.clear()
                _request.update(role=_ROLE, pid=os.getpid(), type=kind, call=time.time(), cpu0=time.process_time())
                try:
                    _request["round"] = int(content["config"].get("server-round", 0))
                    _request["site"] = str(node_config.get("site-config", ""))
                except Exception:
                    pass
                try:
                    return original(content, run_config, node_config, *args, **kwargs)
                finally:
                    _request["return"] = time.time()
                    _request["cpu"] = time.process_time() - _request.pop("cpu0")
                    with open(_LOG, "a") as fh:
                        fh.write(json.dumps(_request) + "\n")
            setattr(module, name, handler)
        wrap("handle_train", "train")
        wrap("handle_evaluate", "evaluate")

    def _wrap_server(module):
        original = module._train_round
        def _train_round(grid, strategy, rnd, *args, **kwargs):
            _marks["rounds"][rnd] = {"send": time.time()}
            try:
                return original(grid, strategy, rnd, *args, **kwargs)
            finally:
                _marks["rounds"][rnd]["replies"] = time.time()
        module._train_round = _train_round

    _HOOKS = {"flwr.clientapp.client_app": _wrap_clientapp, "fedtl.training": _wrap_training,
              "fedtl.federation.server": _wrap_server, "fedtl.federation.handlers": _wrap_handlers}

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in _HOOKS:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    break
            else:
                return None
            exec_module, hook = spec.loader.exec_module, _HOOKS[name]
            def exec_and_wrap(module):
                exec_module(module)
                hook(module)
            spec.loader.exec_module = exec_and_wrap
            return spec

    sys.meta_path.insert(0, _Finder())

    @atexit.register
    def _write():
        if _ROLE == "site-worker":  # its requests are written as they are served
            return
        _mark("exit")
        _marks["cpu"] = sum(os.times()[:2])  # CPU seconds of the whole process
        with open(_LOG, "a") as fh:
            fh.write(json.dumps(_marks) + "\n")
