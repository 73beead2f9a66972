"""PyTorch 2 backend: serves ``*.pt2`` archives, the formats of ``torch.export``.

One file suffix, two kinds of program, told apart by what the archive (a zip) holds:

- an **AOTInductor package** (``torch._inductor.aoti_compile_and_package``): the model
  compiled ahead of time into a shared library, under ``data/aotinductor/``. Run through the
  loader ``aoti_load_package`` uses, with one runner per ``[instances]`` execution.
- an **ExportedProgram** (``torch.export.save``): the model's graph and weights, under
  ``models/``. Run through ``ExportedProgram.module()``, in eval mode, without autograd.

An archive holding both (``torch.export.pt2_archive``'s ``package_pt2``) runs the compiled
code and describes itself from the program.

The signature. An ExportedProgram says everything: input names (``forward()``'s argument
names), dtypes, shapes with the dynamic dimensions as -1. Output names come from a
``forward()`` that returns a dict; a tensor or a tuple of them has positional outputs
(named by config.toml, a sibling variant, or ``output__N``). A compiled package alone keeps
only how many tensors it takes and returns (and the names of keyword arguments and dict
outputs): config.toml or a sibling variant gives the rest, as for TorchScript. Like
TorchScript, the program binds tensors by position (``Signature.positional``).

torch is imported inside ``load``; telling the kinds apart reads the zip directory only.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import (
    Backend,
    BackendError,
    BackendOptions,
    Signature,
    TensorSpec,
    require_inputs,
)
from .torch_runtime import (
    PRECISIONS,
    InferThreads,
    OutputCast,
    autocast,
    import_torch,
    oip_datatype,
    positional_names,
    set_process_threads,
    to_numpy,
    to_tensor,
    torch_device,
)

#: Where a PT2 archive keeps each kind (below its one top-level folder).
_AOTI_DIR = "data/aotinductor/"
_PROGRAMS_DIR = "models/"
#: The model name ``package_pt2`` and ``aoti_compile_and_package`` give a lone model.
_DEFAULT_MODEL = "model"


def archive_kind(path: Path) -> tuple[bool, bool]:
    """(holds compiled AOTInductor code, holds an ExportedProgram) for a ``.pt2`` file.

    Raises BackendError when the file is not a zip archive at all.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise BackendError(
            f"cannot load PyTorch 2 model {path}: not a .pt2 archive (torch.export.save or "
            f"aoti_compile_and_package writes one): {exc}"
        ) from None
    inner = [name.partition("/")[2] for name in names]
    compiled = any(name.startswith(_AOTI_DIR) for name in inner)
    program = any(name.startswith(_PROGRAMS_DIR) and name.endswith(".json") for name in inner)
    return compiled, program


def _leaf_names(pytree: Any, spec: Any) -> list[str | None]:
    """For each leaf of a call spec, the name it has there: a dict key (keyword argument,
    dict output) or None (a positional argument, a tuple element, a lone tensor)."""
    skeleton = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names: list[str | None] = []
    for path, _ in pytree.tree_flatten_with_path(skeleton)[0]:
        keys = [k.key for k in path if isinstance(k, pytree.MappingKey)]
        names.append(str(keys[-1]) if keys else None)
    return names


class TorchExportBackend(Backend):
    """Serves one ``.pt2`` archive: an AOTInductor package or an ExportedProgram.

    ``infer`` may be called from several threads at once: the AOTInductor loader holds one
    runner per instance, and an ExportedProgram's module is reentrant under
    ``torch.inference_mode``. With ``precision = "bf16"`` an ExportedProgram runs under
    torch's autocast and returns the signature's datatypes; compiled code cannot.
    """

    name: ClassVar[str] = "torch_export"
    platform: ClassVar[str] = "pytorch_export"
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS

    def __init__(self) -> None:
        self._torch: Any = None
        self._pytree: Any = None
        self._run: Any = None  # flat list of tensors -> flat list of tensors
        self._device: Any = None
        self._threads: InferThreads | None = None
        self._what = ""
        self._input_names: list[str] = []
        self._output_names: list[str] = []
        self._precision = "fp32"
        self._autocast = autocast(None, None, "fp32")
        self._cast = OutputCast()

    @classmethod
    def find_model_file(cls, variant_dir: Path) -> Path | None:
        preferred = variant_dir / "model.pt2"
        if preferred.is_file():
            return preferred
        candidates = sorted(p for p in variant_dir.glob("*.pt2") if p.is_file())
        return candidates[0] if candidates else None

    def load(self, path: Path, options: BackendOptions) -> Signature:
        torch = import_torch(path, "PyTorch 2 model")
        compiled, program = archive_kind(path)
        if not (compiled or program):
            raise BackendError(
                f"cannot load PyTorch 2 model {path}: the archive holds neither an "
                "ExportedProgram (torch.export.save) nor an AOTInductor package "
                "(aoti_compile_and_package)"
            )
        set_process_threads(torch, options)
        device = torch_device(torch, options.device)
        from torch.utils import _pytree as pytree

        self._torch, self._pytree, self._device = torch, pytree, device
        self._threads = InferThreads(torch, options.intra_op_threads)
        kind = "AOTInductor package" if compiled else "ExportedProgram"
        self._what = f"PyTorch 2 model {path} ({kind})"
        if compiled and options.precision != "fp32":
            raise BackendError(
                f'{self._what}: precision = "{options.precision}" cannot apply to compiled '
                "code, which runs the precision it was compiled in: serve an ExportedProgram "
                "(torch.export.save) this way, or a package compiled in bfloat16 (tensorgate "
                "convert --precision bf16 writes pt2-bf16)"
            )
        self._precision = options.precision
        self._autocast = autocast(torch, device, options.precision)
        try:
            if compiled:
                signature = self._load_compiled(path, device, options.instances, program)
            else:
                signature = self._load_program(path, device)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"cannot load {self._what}: {exc}") from exc
        # Until bind() says otherwise, address tensors by the names the file suggests.
        self._input_names = [s.name or f"input__{i}" for i, s in enumerate(signature.inputs)]
        self._output_names = [s.name or f"output__{i}" for i, s in enumerate(signature.outputs)]
        return signature

    def _load_compiled(self, path: Path, device: Any, instances: int, program: bool) -> Signature:
        torch = self._torch
        # The loader behind torch._inductor.aoti_load_package, which does not pass on
        # num_runners: one runner per instance lets that many calls run at once. It also
        # reads an ExportedProgram packaged beside the compiled code.
        from torch.export.pt2_archive._package import load_pt2

        loader_cls = torch._C._aoti.AOTIModelPackageLoader
        model = _DEFAULT_MODEL
        compiled_for = loader_cls.load_metadata_from_package(str(path), model).get(
            "AOTI_DEVICE_KEY", "cpu"
        )
        if compiled_for != device.type:
            raise BackendError(
                f"{self._what} is compiled for {compiled_for!r} but the variant asks for "
                f"device {str(device)!r}: compile it for that device, or set device = "
                f'"{compiled_for}" in config.toml'
            )
        contents = load_pt2(
            str(path),
            num_runners=max(1, instances),
            device_index=device.index if device.index is not None else -1,
        )
        runner = contents.aoti_runners[model]
        in_spec, out_spec = (self._pytree.treespec_loads(s) for s in runner.loader.get_call_spec())
        boxed_run = runner.loader.boxed_run
        # boxed_run takes the list over (it frees the inputs as it goes): hand it a fresh one.
        self._run = lambda flat: boxed_run(list(flat))
        exported = contents.exported_programs.get(model) if program else None
        if exported is not None:
            return self._describe(exported)
        return Signature(
            inputs=tuple(TensorSpec(name) for name in _leaf_names(self._pytree, in_spec)),
            outputs=tuple(TensorSpec(name) for name in _leaf_names(self._pytree, out_spec)),
            positional=True,
        )

    def _load_program(self, path: Path, device: Any) -> Signature:
        torch, pytree = self._torch, self._pytree
        exported = torch.export.load(str(path))
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            exported = move_to_device_pass(exported, device)
        module = exported.module()
        in_spec = exported.call_spec.in_spec

        def run(flat: list[Any]) -> list[Any]:
            args, kwargs = pytree.tree_unflatten(flat, in_spec)
            return pytree.tree_flatten(module(*args, **kwargs))[0]

        self._run = run
        return self._describe(exported)

    def _describe(self, exported: Any) -> Signature:
        """The signature an ExportedProgram states: its user inputs and outputs."""
        graph_signature = exported.graph_signature
        nodes = {node.name: node for node in exported.graph.nodes}
        inputs = tuple(
            TensorSpec(name, *self._dtype_shape(nodes[name].meta.get("val"), f"input {name!r}"))
            for name in graph_signature.user_inputs
        )
        out_names = _leaf_names(self._pytree, exported.call_spec.out_spec)
        if len(out_names) != len(graph_signature.user_outputs):
            raise BackendError(
                f"{self._what}: forward() returns {len(out_names)} values of which "
                f"{len(graph_signature.user_outputs)} are tensors; tensorgate serves tensors only"
            )
        output_vals = self._output_values(exported)
        outputs = tuple(
            TensorSpec(name, *self._dtype_shape(value, f"output {i}"))
            for i, (name, value) in enumerate(zip(out_names, output_vals, strict=True))
        )
        return Signature(inputs=inputs, outputs=outputs, positional=True)

    @staticmethod
    def _output_values(exported: Any) -> list[Any]:
        output_node = next(n for n in exported.graph.nodes if n.op == "output")
        by_name = {
            getattr(arg, "name", None): getattr(arg, "meta", {}).get("val")
            for arg in output_node.args[0]
        }
        return [by_name.get(name) for name in exported.graph_signature.user_outputs]

    def _dtype_shape(self, value: Any, what: str) -> tuple[str | None, tuple[int, ...] | None]:
        if not isinstance(value, self._torch.Tensor):
            raise BackendError(
                f"{self._what}: {what} is a {type(value).__name__}, not a tensor; tensorgate "
                "passes and returns tensors only"
            )
        datatype = oip_datatype(value.dtype)
        if datatype is None:
            raise BackendError(
                f"{self._what}: {what} has dtype {value.dtype}, which the Open Inference "
                "Protocol cannot carry"
            )
        # A symbolic size (torch.SymInt) is a dynamic dimension.
        return datatype, tuple(d if isinstance(d, int) else -1 for d in value.shape)

    def bind(self, signature: Signature) -> None:
        self._input_names, self._output_names = positional_names(
            self._what, signature, len(self._input_names), len(self._output_names)
        )
        self._cast.bind(self._torch, self._precision, signature.outputs)

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        torch, run = self._torch, self._run
        if run is None or self._threads is None:
            raise BackendError("PyTorch 2 model is not loaded")
        self._threads.enter()
        require_inputs(self._input_names, inputs)
        try:
            flat = [to_tensor(torch, inputs[name], self._device) for name in self._input_names]
            with torch.inference_mode(), self._autocast():
                results = self._cast(run(flat))
            return {
                name: to_numpy(torch, value)
                for name, value in zip(self._output_names, results, strict=True)
            }
        except Exception as exc:
            raise BackendError(f"PyTorch 2 model failed: {exc}") from exc

    def unload(self) -> None:
        self._run = None
