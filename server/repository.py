"""The model repository: ``ROOT/MODEL/VARIANT/<model file>`` plus ``MODEL/config.toml``.

Scans the directory, loads each variant's backend off the event loop, merges the variants'
signatures into one, and keeps the live set of models. A reload builds the new model
completely before swapping it in, then lets the old one finish what it accepted. What it
holds, ``Model`` and ``Variant``, is in ``model.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import grpc

from tensorgate.backends import (
    Backend,
    BackendError,
    BackendOptions,
    Signature,
    available_names,
    backend_class,
    detect,
)
from tensorgate.backends.isolated import IsolatedBackend, Warmup
from tensorgate.errors import (
    ConfigError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    TensorgateError,
)

from .config import ModelConfig, load_model_config
from .metrics import Metrics
from .model import NAME, Model, State, Variant, check_model_name, is_version, variant_order
from .policy import RouteError, policy_from_config, validate_policy
from .scheduler import BatchPolicy, Scheduler
from .signature import merge_signatures
from .warmup import WarmupTimeout, warm_up, warmup_inputs
from .writelock import check_not_written

log = logging.getLogger(__name__)

__all__ = [
    "Model",
    "ReloadRefused",
    "Repository",
    "State",
    "Variant",
    "check_model_name",
    "walk_tree",
]


class ReloadRefused(ConfigError):
    """A reload whose new files fail where the loaded version serves: nothing was swapped."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def _setting(config: ModelConfig, variant: str, attr: str):
    """A variant's setting: its ``[variants.NAME]`` value over the model-wide one."""
    vcfg = config.variants.get(variant)
    value = getattr(vcfg, attr) if vcfg is not None else None
    return value if value is not None else getattr(config, attr)


def _batch_policy(config: ModelConfig) -> BatchPolicy | None:
    b = config.batching
    if b is None:
        return None
    return BatchPolicy(
        max_batch_size=b.max_batch_size or config.max_batch_size,
        max_queue_delay=b.max_queue_delay_us / 1e6,
        preferred_batch_sizes=tuple(b.preferred_batch_sizes),
    )


def _aliases(model: Model, names: list[str]) -> dict[str, str]:
    """``{"3": "onnx"}`` from the ``[variants.NAME] version = N`` fields. Raises ConfigError
    naming both variants when a version is given twice or is a variant directory's name."""
    where = model.directory / "config.toml"
    aliases: dict[str, str] = {}
    for vname, vcfg in model.config.variants.items():
        if vcfg.version is None:
            continue
        alias = str(vcfg.version)
        if is_version(vname):
            raise ConfigError(
                f"{where}: field 'variants.{vname}.version': variant '{vname}' is an integer "
                "version already; only named variants take a version, remove the field"
            )
        if alias in names:
            raise ConfigError(
                f"{where}: field 'variants.{vname}.version': version {alias} of variant "
                f"'{vname}' is also variant directory '{alias}' ({model.name}/{alias}/); give "
                f"'{vname}' another version or rename the directory"
            )
        if alias in aliases:
            raise ConfigError(
                f"{where}: field 'variants.{vname}.version': version {alias} is given to both "
                f"variant '{aliases[alias]}' and variant '{vname}'; give each its own version"
            )
        aliases[alias] = vname
    return aliases


def walk_tree(directory: Path, root: Path, *, hidden: bool = False) -> Iterator[str]:
    """Every directory and file under ``directory``, in sorted order, following symlinks:
    each real directory is entered once (link cycles end), and never one outside ``root``
    (it is listed, not entered). Names starting with "." are left out unless ``hidden``.
    The one walk of a model's files: for escaping symlinks (``outside_root``) and for the
    poller's change detection (``polling.fingerprint``)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or not Path(real).is_relative_to(root):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if hidden or not d.startswith("."))
        files = sorted(f for f in filenames if hidden or not f.startswith("."))
        for name in (*dirnames, *files):
            yield os.path.join(dirpath, name)


class Repository:
    """The live set of models served from one directory."""

    def __init__(self, root: Path, metrics: Metrics) -> None:
        self.root = root.resolve()
        self.metrics = metrics
        self.models: dict[str, Model] = {}
        # Models on disk being loaded for the first time: asked for, they answer
        # UNAVAILABLE "loading" (retry), not NOT_FOUND (a model that does not exist).
        self.loading: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        # Variants released in the background: their warmup hung past its timeout.
        self._releasing: set[asyncio.Task[None]] = set()

    # -- lookup -------------------------------------------------------------------------
    def get(self, name: str) -> Model:
        """The loaded model ``name``. Raises ModelNotFound, or ModelNotReady while a model
        of that name is being loaded for the first time."""
        model = self.models.get(name)
        if model is None:
            if name in self.loading:
                raise ModelNotReady(f"model '{name}' is loading; retry shortly")
            raise ModelNotFound(name)
        return model

    def scan(self) -> list[str]:
        """Names of the model directories under the root."""
        if not self.root.is_dir():
            raise ConfigError(f"model repository {self.root} is not a directory")
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and NAME.match(p.name) and not p.name.startswith(".")
        )

    def model_dir(self, name: str) -> Path:
        """The directory of model ``name``, refusing anything that resolves outside the root."""
        check_model_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidInput(f"model '{name}' resolves outside the model repository")
        return path

    def outside_root(self, directory: Path) -> Path | None:
        """The first file or directory under ``directory`` that resolves outside the root
        (a symlink escaping it), or None. Symlinks that stay inside the root are fine."""
        for path in walk_tree(directory, self.root, hidden=True):
            if not Path(os.path.realpath(path)).is_relative_to(self.root):
                return Path(path)
        return None

    # -- load / unload ------------------------------------------------------------------
    async def load_all(self) -> None:
        names = self.scan()
        self.loading.update(names)
        for name in names:
            try:
                await self.load(name)
            except TensorgateError as e:  # e.g. a directory linked from outside the root
                log.error("model %s: %s", name, e)
                self.models[name] = Model(name, self.root / name, reason=str(e))
            finally:
                self.loading.discard(name)

    async def load(self, name: str) -> Model:
        """(Re)load model ``name`` from disk. Failures are recorded on the model (not raised)
        unless the directory does not exist. The previous version keeps serving until the
        new one is ready; if the new one fails entirely, the old one stays."""
        directory = self.model_dir(name)
        check_not_written(self.root)  # a writer holds the repository: half its files
        if not directory.is_dir():
            raise ModelNotFound(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self.models:
                self.loading.add(name)
            try:
                model = await self._build(name, directory)
            finally:
                self.loading.discard(name)
            old = self.models.get(name)
            # A reload must not lose what serves: if the new files fail as a whole, or fail
            # for a variant that serves now, the loaded version stays, and says why.
            serving = {v.name for v in old.ready_variants()} if old is not None else set()
            lost = [v for v in model.variants.values() if v.name in serving and not v.ready]
            if old is not None and old.ready and (not model.ready or lost):
                failed = lost or [v for v in model.variants.values() if not v.ready]
                why = "; ".join(
                    [model.reason] * bool(model.reason)
                    + [f"variant {v.name}: {v.reason}" for v in failed if v.reason != model.reason]
                )
                log.error("reload of %s failed, keeping the loaded version: %s", name, why)
                await self._close(model)
                for v in old.ready_variants():
                    v.reason = f"serving the files loaded before; the last reload failed: {why}"
                raise ReloadRefused(
                    f"model '{name}' was not reloaded, the loaded version keeps serving: {why}"
                )
            self.models[name] = model
            self._export_ready(model)
            if old is not None:
                self._export_ready(old, gone=True)
                await self._close(old)
            return model

    async def unload(self, name: str, *, collect: bool = True) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self.models.pop(name, None)
            if model is None:
                raise ModelNotFound(name)
            self._export_ready(model, gone=True)
            await self._close(model, collect=collect)

    async def close(self) -> None:
        for name in list(self.models):
            await self.unload(name, collect=False)  # the process is about to exit

    async def _close(self, model: Model, *, collect: bool = True) -> None:
        for v in model.variants.values():
            v.state = State.UNAVAILABLE
            v.reason = v.reason or "unloaded"
        in_process = False
        for v in model.variants.values():
            in_process |= await self._stop(v)
        if in_process and collect:
            # A loaded SavedModel is a web of reference cycles that only a full collection
            # frees; left to the automatic one, RSS climbed ~120 KiB per reload, in a
            # sawtooth (docs/reliability.md). One pause per unload (~150 ms with TensorFlow
            # and torch imported, a few ms without) keeps it flat.
            await asyncio.to_thread(gc.collect)

    @staticmethod
    async def _stop(v: Variant) -> bool:
        """Stop a variant's scheduler and unload its backend. Returns whether the backend
        ran in this process (its memory is ours to collect)."""
        if v.scheduler is not None:
            scheduler, v.scheduler = v.scheduler, None
            await scheduler.close()
        if v.backend is None:
            return False
        backend, v.backend = v.backend, None
        await asyncio.to_thread(backend.unload)
        return not isinstance(backend, IsolatedBackend)

    def _release_hung(self, v: Variant) -> None:
        """Release a variant whose execution hangs without waiting for it: an isolated
        worker is killed; a call in this process cannot be stopped, so its scheduler and
        backend are released in the background once the call returns."""
        # Detached now, so that nothing else (a refused reload's cleanup) waits on them.
        scheduler, backend = v.scheduler, v.backend
        v.scheduler, v.backend = None, None
        if isinstance(backend, IsolatedBackend):
            backend.kill()

        async def release() -> None:
            if scheduler is not None:
                await scheduler.close()
            if backend is not None:
                await asyncio.to_thread(backend.unload)

        task = asyncio.get_running_loop().create_task(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _export_ready(self, model: Model, gone: bool = False) -> None:
        for v in model.variants.values():
            self.metrics.model_ready.labels(model.name, v.name, v.backend_name).set(
                0 if gone else int(v.ready)
            )

    async def _build(self, name: str, directory: Path) -> Model:
        model = Model(name, directory)
        try:
            escape = self.outside_root(directory)
            if escape is not None:
                raise ConfigError(
                    f"{escape} resolves outside the model repository {self.root}; models may "
                    "only use files inside it (symlinks within it are fine)"
                )
            model.config = load_model_config(directory)
            model.variants = self._discover(model)
        except TensorgateError as e:
            model.reason = str(e)
            log.error("model %s: %s", name, e)
            return model
        signatures: dict[str, Signature] = {}
        for v in model.variants.values():
            try:
                signatures[v.name] = await asyncio.to_thread(self._load_variant, model, v)
            except BackendError as e:
                v.state, v.reason = State.UNAVAILABLE, f"failed to load: {e}"
                log.error("model %s variant %s: %s", name, v.name, v.reason)
        if not signatures:
            model.reason = model.reason or "no variant could be loaded"
            return model
        warmup = model.config.warmup
        samples = None
        try:
            model.signature, bound = merge_signatures(name, model.config, signatures)
            for vname, sig in bound.items():
                model.variants[vname].backend.bind(sig)  # type: ignore[union-attr]
            if warmup is not None and warmup.requests > 0:
                samples = warmup_inputs(name, directory, warmup, model.signature)
        except (TensorgateError, BackendError) as e:
            model.reason = str(e)
            log.error("%s", e)
            for vname in signatures:
                model.variants[vname].state = State.UNAVAILABLE
                model.variants[vname].reason = str(e)
            await self._close(model)
            return model
        for vname in signatures:
            v = model.variants[vname]
            v.scheduler = Scheduler(
                v.backend,  # type: ignore[arg-type]
                name=f"{name}/{vname}",
                instances=model.config.instances.count,
                max_queue_size=model.config.instances.max_queue_size,
                batching=_batch_policy(model.config),
                on_queue_change=self.metrics.queued.labels(name, vname, v.backend_name).set,
                # A GPU execution waits on its device: never on the event loop.
                may_inline=v.options.device.kind == "cpu",
            )
            v.scheduler.start()
            if samples is not None:
                assert warmup is not None
                try:
                    await warm_up(v.scheduler, samples, warmup.requests, warmup.timeout_s)
                except TensorgateError as e:
                    v.state = State.UNAVAILABLE
                    v.reason = (
                        f"warmup failed ({warmup.requests} request(s) of {warmup.data} data, "
                        f"batch_size {warmup.batch_size}): {e}"
                    )
                    log.error("model %s variant %s: %s", name, vname, v.reason)
                    if isinstance(e, WarmupTimeout):
                        self._release_hung(v)
                    else:
                        await self._stop(v)
                    continue
                if isinstance(v.backend, IsolatedBackend):  # warm a restarted worker too
                    v.backend.warmup = Warmup(samples, warmup.requests, warmup.timeout_s)
            v.state = State.READY
        log.info(
            "model %s ready: %s",
            name,
            ", ".join(f"{v.name} ({v.backend_name})" for v in model.ready_variants()),
        )
        return model

    def _discover(self, model: Model) -> dict[str, Variant]:
        cfg = model.config
        names = [
            p.name
            for p in model.directory.iterdir()
            if p.is_dir() and NAME.match(p.name) and not p.name.startswith(".")
        ]
        for configured in cfg.variants:
            if configured not in names:
                raise ConfigError(
                    f"{model.directory / 'config.toml'}: field 'variants.{configured}': no "
                    f"directory {model.name}/{configured}/; variants are {sorted(names)}"
                )
        if cfg.default_variant is not None and cfg.default_variant not in names:
            raise ConfigError(
                f"{model.directory / 'config.toml'}: field 'default_variant': no variant "
                f"'{cfg.default_variant}'; variants are {sorted(names)}"
            )
        model.aliases = _aliases(model, names)
        try:
            model.policy = validate_policy(policy_from_config(cfg.routing), names)
        except RouteError as e:
            raise ConfigError(
                f"{model.directory / 'config.toml'}: field 'routing.{e.field}': {e}"
            ) from None
        variants: dict[str, Variant] = {}
        for vname in variant_order(names):
            vdir = model.directory / vname
            vcfg = cfg.variants.get(vname)
            backend_name = (vcfg.backend if vcfg else None) or cfg.backend
            if backend_name is not None:
                try:
                    cls = backend_class(backend_name)
                except KeyError:
                    raise ConfigError(
                        f"{model.directory / 'config.toml'}: field 'backend': unknown backend "
                        f"'{backend_name}'; use one of {available_names()}"
                    ) from None
                path = cls.find_model_file(vdir)
                if path is None:
                    variants[vname] = Variant(
                        model.name,
                        vname,
                        backend_name,
                        cls.platform,
                        vdir,
                        State.UNAVAILABLE,
                        f"no {backend_name} model file in {vdir}",
                    )
                    continue
            else:
                found = detect(vdir)
                if found is None:
                    variants[vname] = Variant(
                        model.name,
                        vname,
                        "",
                        "",
                        vdir,
                        State.UNAVAILABLE,
                        f"no model file found in {vdir} (expected *.pt, *.pt2, *.onnx, "
                        "*.tflite or a SavedModel)",
                    )
                    continue
                cls, path = found
            variants[vname] = Variant(model.name, vname, cls.name, cls.platform, path)
        if not variants:
            raise ConfigError(
                f"model directory {model.directory} has no variant subdirectories; put the "
                f"model file in {model.directory}/<variant>/, e.g. {model.name}/1/model.onnx"
            )
        return variants

    def _load_variant(self, model: Model, v: Variant) -> Signature:
        """Runs in a worker thread."""
        cfg = model.config

        def pick(attr: str):
            return _setting(cfg, v.name, attr)

        if v.state is State.UNAVAILABLE:  # nothing to load (reason already recorded)
            raise BackendError(v.reason)
        vcfg = cfg.variants.get(v.name)
        options = BackendOptions(
            device=pick("device"),
            intra_op_threads=pick("intra_op_threads"),
            inter_op_threads=pick("inter_op_threads"),
            instances=cfg.instances.count,
            signature_name=pick("signature_name"),
            precision=(vcfg.precision if vcfg else None) or "fp32",
        )
        v.options = options
        if options.precision not in backend_class(v.backend_name).precisions:
            raise BackendError(
                f'[variants.{v.name}] precision = "{options.precision}": the '
                f"{v.backend_name} backend runs a model in the precision of its file; only "
                "the torchscript and torch_export backends take it (or convert the file: "
                "tensorgate convert --precision, docs/convert.md)"
            )
        backend: Backend
        if pick("isolation") == "process":
            backend = IsolatedBackend(
                v.backend_name,
                label=f"{model.name}/{v.name}",
                execution_timeout=pick("execution_timeout_s"),
            )
        else:
            backend = backend_class(v.backend_name)()
        signature = backend.load(v.path, options)
        v.backend = backend
        v.platform = backend.platform  # a backend may learn its platform at load (remote)
        return signature
