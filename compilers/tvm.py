"""Apache TVM backend: Relax import, targets from the profile (x86 / aarch64 CPUs, CUDA for Jetson), MetaSchedule
tuning with a reusable per-profile database, and a shared library the device loads with only the TVM runtime.

Tuning measures candidate schedules by running them: on this host when it has the profile's CPU architecture, else
on a device of that kind in the user's fleet (`--measure-on`, compilers/_tvm_fleet.py); without one, the database
(filled by an earlier tuning run, or copied in) is applied and the report says what was not measured. CUDA builds
are scheduled with dlight's GPU rules: no GPU is here to time. Foreign builds are verified through a host build of
the same Relax module (the report says so).

Pinned to apache-tvm 0.25 with apache-tvm-ffi 0.1.12: with 0.27 and the ffi that pip picks (0.1.15) MetaSchedule
segfaults, and with ffi 0.1.14 its MultiLevelTiling fails on every fused conv/matmul task (see docs/tvm.md).
"""

import importlib.metadata
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult, HostStandIn
from edgekit.compilers._tvm_fleet import FleetTiming, cross_export, fleet_runner
from edgekit.errors import BadInput
from edgekit.paths import edgekit_cache
from edgekit.profiles import Profile, host_arch
from edgekit.schema import Precision

CROSS_LINKERS = {"aarch64": "aarch64-linux-gnu-gcc"}
AARCH64_ATTRS = {"dotprod": "+dotprod", "fp16": "+fullfp16"}  # profile ISA name → LLVM attribute


class TvmOptions(BackendOptions):
    tune_trials: int = Field(0, ge=0)  # MetaSchedule trials in all (0: apply the database only)
    trials_per_task: int = 64
    database: str | None = None  # tuning database folder [default: per profile in the user cache]


class UnsupportedByTvm(BadInput):
    """The model uses an op TVM's ONNX importer lacks (exit 2 when TVM was the only backend asked for)."""


class TvmBackend(Backend):
    name = "tvm"
    module = "tvm"
    precisions = frozenset({"fp32", "fp16", "int8"})
    Options = TvmOptions
    keeps_float = True

    def emulate(
        self, result: BuildResult, profile: Profile, feeds: list[dict[str, np.ndarray]]
    ) -> list[np.ndarray] | None:
        """An aarch64 library built on another host runs under qemu-user (edgekit.compile.emulation)."""
        if profile.cpu.arch != "aarch64" or host_arch() == "aarch64":
            return None
        from edgekit.compile import emulation

        return emulation.run_tvm_library(result.entrypoint, feeds)

    def unsupported_reason(self, profile: Profile, precision: Precision) -> str | None:
        if profile.cpu.arch not in ("x86_64", "aarch64"):
            return f"TVM builds here target x86-64 and aarch64, not {profile.cpu.arch}"
        if precision == "fp16" and profile.accelerator.kind != "cuda":
            return "fp16 with TVM is for CUDA profiles (CPU fp16 arithmetic is slower than fp32 here)"
        if precision == "int8" and profile.accelerator.kind == "cuda":
            return "int8 with TVM is for CPU profiles (CUDA builds use fp16)"
        return super().unsupported_reason(profile, precision)

    def versions(self) -> dict[str, str]:
        return {name: importlib.metadata.version(name) for name in ("apache-tvm", "apache-tvm-ffi")}

    def build(self, request: BuildRequest) -> BuildResult:
        options: TvmOptions = request.options  # type: ignore[assignment]
        profile = request.profile
        database = Path(options.database) if options.database else edgekit_cache() / "tvm" / profile.name
        target = device_target(profile)
        source = request.model.path
        if request.precision == "int8":
            from edgekit.compilers.onnxruntime import quantize_qdq

            # Relax has no quantizer of its own (Relay's went with Relay): import ONNX Runtime's QDQ graph, whose
            # Quantize/DequantizeLinear pairs TVM lowers and fuses into the neighbouring kernels.
            source = quantize_qdq(request, who="tvm")
        with request.progress.task(f"tvm {request.precision}: importing and lowering", total=1):
            imported = import_onnx(source)
            module = lower(imported, request.precision, target)
        details: dict[str, Any] = {"target": describe(profile), "database": str(database)}
        if profile.accelerator.kind == "cuda":
            scheduled = schedule_gpu(module, target)
            details["tuning"] = "none: CUDA kernels use dlight's default GPU schedules (no GPU here to time them)"
            details["cuda_kernels"] = enable_cuda_binaries(profile.accelerator.arch)
        else:
            details.update(tune(module, target, database, options, request))
            scheduled = apply_database(module, target, database)
        artifact = request.outdir / "model.so"
        with request.progress.task(f"tvm {request.precision}: compiling for {profile.cpu.arch}", total=1):
            export(compile_module(scheduled, target), artifact, profile.cpu.arch)
        return BuildResult(
            entrypoint=artifact,
            runtime="tvm",
            target={"device": "cuda", "arch": profile.accelerator.arch}
            if profile.accelerator.kind == "cuda"
            else {"device": "cpu"},
            param_bytes=request.model.param_bytes // (2 if request.precision == "fp16" else 1),
            host_stand_in=self._host_stand_in(imported, request, database),
            details=details,
        )

    @staticmethod
    def _host_stand_in(imported, request: BuildRequest, database: Path) -> HostStandIn | None:
        profile = request.profile
        if profile.host_can_run() and profile.accelerator.kind == "none":
            return None
        stand_in = request.outdir.parent / "host" / "model.so"
        host = host_target()
        with request.progress.task("tvm: host build of the same module, for verification", total=1):
            module = lower(imported, request.precision, host)
            export(compile_module(apply_database(module, host, database), host), stand_in, host_arch())
        return HostStandIn(
            entrypoint=stand_in, runtime="tvm", target={"device": "cpu"},
            note=f"an x86 CPU build of the same TVM module ({_why_not_here(profile)})",
        )  # fmt: skip


def _why_not_here(profile: Profile) -> str:
    if profile.accelerator.kind == "cuda":
        return "the CUDA kernels cannot run on this host"
    if not profile.runs_on_this_host():
        return f"the {profile.cpu.arch} .so cannot run on this host"
    return f"the .so uses {', '.join(profile.isa_missing_here())}, which this host's CPU lacks"


def import_onnx(path: Path):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    from edgekit.compile.lowering import unroll_recurrent

    # TVM's ONNX frontend has no LSTM; unrolled, it is Gemm and element-wise ops (in float: the QDQ graph of an
    # int8 build leaves recurrent cells unquantized).
    model, _, _ = unroll_recurrent(onnx.load(str(path)))
    reshape_scalar_qdq_to_vectors(model)
    try:
        return from_onnx(model, keep_params_in_input=False)
    except Exception as error:  # TVM raises assorted error types for unsupported ops
        message = str(error).strip().splitlines()
        raise UnsupportedByTvm(
            f"TVM cannot import this model: {message[0] if message else type(error).__name__}"
        ) from None


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def reshape_scalar_qdq_to_vectors(model) -> int:
    """Give every Quantize/DequantizeLinear on a 0-d tensor a 1-element view of it; returns how many it changed.

    ONNX Runtime's quantizer quantizes scalar constants too (PP-OCR's hard-swish `x + 3` shares one 0-d
    DequantizeLinear). TVM's ONNX importer maps such a node to relax.quantize/dequantize with axis 0, which Relax
    rejects on a 0-d tensor ("axis param is out of range (0)"). Reshape to [1] before the node and back to [] after
    it computes the same values with a rank Relax accepts; constant inputs fold away when TVM lowers the module."""
    from onnx import NodeProto, helper, numpy_helper

    graph = model.graph
    if not any(node.op_type in QDQ_OPS for node in graph.node):
        return 0  # a float model: no shape inference needed
    ranks = _tensor_ranks(model)
    as_vector, as_scalar = "edgekit_qdq_shape_1", "edgekit_qdq_shape_scalar"
    nodes: list[NodeProto] = []
    for original in graph.node:
        node = NodeProto()
        node.CopyFrom(original)  # graph.node is rebuilt below, and its elements do not outlive that
        if node.op_type not in QDQ_OPS or ranks.get(node.input[0]) != 0:
            nodes.append(node)
            continue
        source, result = node.input[0], node.output[0]
        node.input[0], node.output[0] = f"{source}_edgekit_vector", f"{result}_edgekit_vector"
        nodes.append(helper.make_node("Reshape", [source, as_vector], [node.input[0]], name=f"{node.name}_to_1"))
        nodes.append(node)
        nodes.append(helper.make_node("Reshape", [node.output[0], as_scalar], [result], name=f"{node.name}_to_0d"))
    changed = (len(nodes) - len(graph.node)) // 2
    if changed:
        graph.initializer.extend([
            numpy_helper.from_array(np.array([1], np.int64), as_vector),
            numpy_helper.from_array(np.zeros(0, np.int64), as_scalar),
        ])  # fmt: skip
        del graph.node[:]
        graph.node.extend(nodes)
    return changed


def _tensor_ranks(model) -> dict[str, int]:
    """Rank of every tensor of the main graph whose rank is known: initializers, and what shape inference finds
    (graph inputs, Constant nodes, computed tensors)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in (*inferred.input, *inferred.value_info, *inferred.output)
        if info.type.tensor_type.HasField("shape")
    }
    ranks.update({tensor.name: len(tensor.dims) for tensor in model.graph.initializer})
    return ranks


def lower(module, precision: Precision, target):
    """Decompose, canonicalize and legalize to TIR for the target (what MetaSchedule tunes and dlight schedules)."""
    import tvm
    from tvm import relax
    from tvm.relax import transform

    prepare = tvm.transform.Sequential([transform.DecomposeOpsForInference(), transform.CanonicalizeBindings()])
    with target:
        module = prepare(module)
        if precision == "fp16":
            keep_float32_calls_with_non_tensor_arguments(module)
            module = transform.ToMixedPrecision(out_dtype="float16")(module)
        return relax.pipeline.zero_pipeline()(module)


# ToMixedPrecision's own value for "not a call of an op": it casts the call's tensor arguments back to the dtypes
# they had, as it does for calls of Relax functions.
NOT_AN_OP_CALL = -1


def keep_float32_calls_with_non_tensor_arguments(module) -> None:
    """Let ToMixedPrecision keep in float32 the op calls it cannot convert that also take a non-tensor argument.

    The pass keeps an op without a mixed-precision policy in float32 ("never fp16"), and once an input of it has
    become fp16 it casts every argument back to its old dtype, non-tensor ones included, which fails with
    "Expected TensorStructInfo, but got R.Callable" (R.call_tir, which TVM's ONNX importer emits for Clip as
    ReLU6, Pad, Resize, Tile, CumSum, Einsum) or "… got R.Prim" (R.clip, from HardSigmoid). Giving those ops the
    pass's "not an op call" value takes its other path, which casts only the tensor arguments back to float32:
    what "never fp16" means, without the crash. Registered once per process, only for ops that have no policy."""
    import tvm
    from tvm import relax

    ops: set[str] = set()

    def note_op_with_non_tensor_argument(expr) -> None:
        if (
            isinstance(expr, relax.Call)
            and isinstance(expr.op, tvm.ir.Op)
            and not all(_is_tensors(arg.struct_info) for arg in expr.args)
        ):
            ops.add(expr.op.name)

    for function in module.functions.values():
        if isinstance(function, relax.Function):
            relax.analysis.post_order_visit(function, note_op_with_non_tensor_argument)
    for name in sorted(ops):
        if tvm.ir.Op.get(name).get_attr("TMixedPrecisionPolicy") is None:
            tvm.ir.register_op_attr(name, "TMixedPrecisionPolicy", NOT_AN_OP_CALL)


def _is_tensors(info) -> bool:
    """A tensor or a (nested) tuple of tensors: the arguments ToMixedPrecision can cast."""
    from tvm import relax

    if isinstance(info, relax.TupleStructInfo):
        return all(map(_is_tensors, info.fields))
    return isinstance(info, relax.TensorStructInfo)


def _llvm(profile_arch: str, triple: str, cpu: str, isa: list[str], cores: int) -> dict[str, Any]:
    target: dict[str, Any] = {"kind": "llvm", "mtriple": triple, "mcpu": cpu, "num-cores": cores}
    if profile_arch == "aarch64":
        target["mattr"] = ["+neon"] + [attr for flag, attr in AARCH64_ATTRS.items() if flag in isa]
    return target


def describe(profile: Profile) -> str:
    cpu = _llvm(profile.cpu.arch, profile.cpu.triple, profile.cpu.model, profile.cpu.isa, profile.cpu.cores)
    text = f"llvm {cpu['mtriple']} {cpu['mcpu']} {' '.join(cpu.get('mattr', []))}".rstrip()
    return f"cuda {profile.accelerator.arch} with host {text}" if profile.accelerator.kind == "cuda" else text


def host_target():
    """This machine's CPU by name: the wheel's LLVM rejects `-mcpu=native` with its default (conda) triple and
    falls back to generic x86-64, which leaves AVX2/AVX-512 unused."""
    import tvm
    from tvm.target.codegen import llvm_get_system_cpu

    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}[host_arch()]
    return tvm.target.Target(
        {"kind": "llvm", "mtriple": triple, "mcpu": llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )


def device_target(profile: Profile):
    import tvm

    cores = min(profile.cpu.cores, os.cpu_count() or 1) if profile.runs_on_this_host() else profile.cpu.cores
    cpu = _llvm(profile.cpu.arch, profile.cpu.triple, profile.cpu.model, profile.cpu.isa, cores)
    if profile.accelerator.kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": profile.accelerator.arch}, host=tvm.target.Target(cpu))
    return tvm.target.Target(cpu)


def schedule_gpu(module, target):
    from tvm.s_tir import dlight

    gpu = dlight.gpu
    rules = (gpu.Matmul(), gpu.GEMV(), gpu.Reduction(), gpu.GeneralReduction(), gpu.Fallback())
    with target:
        return dlight.ApplyDefaultSchedule(*map(passing_on_failure, rules))(module)


def passing_on_failure(rule):
    """The dlight rule, except that a rule which raises is taken as not applying, so the next rule schedules the
    function. dlight stops the whole build instead: its GEMV rule raises NameError ("name 'TX' is not defined")
    on a reduction whose epilogue broadcasts, e.g. a squeeze-and-excitation block's pooled scale (PP-OCR cls).
    Each rule schedules its own copy of the function, so a failed one leaves nothing behind."""
    from tvm.s_tir import dlight

    class PassingOnFailure(dlight.ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except Exception as error:  # dlight's rules raise assorted errors on patterns they misjudge
                logging.getLogger(__name__).debug("dlight %s did not schedule a function: %s",
                                                  type(rule).__name__, error)  # fmt: skip
                return None

    return PassingOnFailure()


def tune(module, target, database: Path, options: TvmOptions, request: BuildRequest) -> dict:
    """Tune only the tasks the database has no record for: on this host when it has the profile's CPU, else on a
    fleet device of the profile through `request.trial_timer` (--measure-on; compilers/_tvm_fleet.py)."""
    from tvm.s_tir import meta_schedule as ms

    profile = request.profile
    database.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(database))
    tasks = ms.relax_integration.extract_tasks(module, target)
    missing = [t for t in tasks if db.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
    facts: dict[str, Any] = {"tasks": len(tasks), "tuned_before": len(tasks) - len(missing)}
    on_host = profile.host_can_run()
    if not on_host and request.trial_timer is None:
        facts["tuning"] = (
            f"not on this host ({_why_not_here(profile)}; --measure-on a device would time it); applied "
            f"{facts['tuned_before']} of {len(tasks)} task records from the database"
        )
        return facts
    if not options.tune_trials or not missing:
        facts["tuning"] = f"none this run; {facts['tuned_before']} of {len(tasks)} tasks have database records"
        return facts
    trials = max(options.tune_trials, 8 * len(missing))
    fleet = None if on_host else FleetTiming(request.trial_timer)  # type: ignore[arg-type]
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    # One tuning session for all missing tasks: its builder/runner worker pools start once, and the gradient
    # task scheduler spends the trials where latency improves most.
    where = "on this host" if fleet is None else f"on {fleet.timer.target}"
    with request.progress.task(f"tvm: tuning {len(missing)} tasks {where}, {trials} trials", total=1):
        contexts = [
            ms.TuneContext(
                mod=task.dispatched[0], target=target, space_generator="post-order-apply",
                search_strategy=search_strategy(trials // len(missing)), task_name=task.task_name,
            )
            for task in missing
        ]  # fmt: skip
        ms.tune_tasks(
            tasks=contexts, task_weights=[float(task.weight) for task in missing], work_dir=str(database),
            builder=in_process_builder(None if fleet is None else cross_export(CROSS_LINKERS.get(profile.cpu.arch))),
            runner="local" if fleet is None else fleet_runner(fleet),
            max_trials_global=trials, max_trials_per_task=options.trials_per_task,
            num_trials_per_iter=min(64, options.trials_per_task, max(8, trials // len(missing))), database=db,
        )  # fmt: skip
    how = "on this host" if fleet is None else fleet.describe()
    facts.update(tuning=f"tuned {len(missing)} tasks, {trials} trials budget: {how}", trials=trials)
    if fleet is not None:
        facts.update(tuned_on=fleet.device or None, fleet_batches=fleet.batches, fleet_trials_timed=fleet.timed)
    return facts


def in_process_builder(export=None):
    """Builds trial schedules in this process, exported by `export` (default: MetaSchedule's own). MetaSchedule's
    LocalBuilder starts fresh worker processes for every batch of trials (against a leak), and each spends ~10 s
    of CPU importing TVM (its tensor intrinsics parse TVMScript through inspect.stack) before it builds anything:
    on 2 cores that was nearly all of the tuning time, 0 records in 14 minutes. This process has TVM loaded
    already."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    export = export or default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(BuilderResult(export(default_build(item.mod, item.target, None)), None))
                except Exception as error:  # a schedule that does not build is a failed trial, not a failed tuning
                    results.append(BuilderResult(None, f"build failed: {error}"))
            return results

    return InProcessBuilder()


def search_strategy(trials: int):
    """MetaSchedule's evolutionary search, with its population scaled to the trial budget: the default 512
    candidates per generation cost a minute per task on 2 cores even when only a few trials are measured."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=min(512, max(64, trials * 8)))


def apply_database(module, target, database: Path):
    from tvm.relax import transform

    if not (database / "database_tuning_record.json").exists():
        return module
    with target:
        return transform.MetaScheduleApplyDatabase(str(database))(module)


def compile_module(module, target):
    import tvm

    # Inside the target's scope: the nvcc callback reads the CUDA arch from Target.current().
    with target:
        return tvm.compile(module, target=target)


def enable_cuda_binaries(arch: str) -> str:
    """Make TVM compile CUDA kernels to `arch` binaries with nvcc on this host, GPU or not; says what it will ship.

    TVM's CUDA code generator lives in libtvm_runtime_cuda.so, which only loads where the driver's cu* symbols
    are (libcuda.so.1). Without them TVM silently keeps the kernels as CUDA C source, which a device's TVM runtime
    cannot load. On a build host without a driver, a stub libcuda.so.1 (every entry point answers "no device",
    like the CUDA toolkit's own link stubs) lets the generator load; nothing in a build calls the driver."""
    import tvm_ffi

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("CUDA builds need nvcc (the CUDA toolkit) on this host to compile the kernels")
    version = _nvcc_version(nvcc)
    if arch.removeprefix("sm_") not in _nvcc_archs(nvcc):
        raise RuntimeError(f"this host's nvcc ({version}) cannot compile for {arch}")
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        _load_tvm_cuda_codegen()
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")  # TVM's default, NVRTC, needs the cuda-python package
    return f"{arch} binary (cubin in a fatbin) compiled with nvcc {version}, no PTX"


def _nvcc_archs(nvcc: str) -> set[str]:
    listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=False).stdout.split()
    return {code.removeprefix("sm_") for code in listed if code.startswith("sm_")}


def _nvcc_version(nvcc: str) -> str:
    banner = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return next((line.split("release")[-1].split(",")[0].strip() for line in banner.splitlines() if "release" in line),
                "unknown")  # fmt: skip


def _load_tvm_cuda_codegen() -> None:
    import ctypes

    import tvm_ffi
    from tvm.base import _LOADED_LIBS

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(_driver_stub(runtime_dir / "libtvm_runtime_cuda.so")), mode=ctypes.RTLD_GLOBAL)
    _LOADED_LIBS["tvm_runtime_cuda"] = tvm_ffi.libinfo.load_lib_ctypes(
        package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
    )
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise RuntimeError("TVM's CUDA code generator (libtvm_runtime_cuda.so) did not load")


def _driver_stub(sidecar: Path) -> Path:
    """libcuda.so.1 with every driver entry point the sidecar (libtvm_runtime_cuda.so) imports, each answering
    "no device"; built once into the user cache (never shipped in a bundle)."""
    stub = edgekit_cache() / "cuda-stub" / importlib.metadata.version("apache-tvm") / "libcuda.so.1"
    if stub.exists():
        return stub
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(sidecar)], capture_output=True, text=True,
                               check=True).stdout.split()  # fmt: skip
    names = sorted({name for name in undefined if name.startswith("cu") and "@" not in name})
    lines = [
        f'int {name}(int e, const char **s) {{ if (s) *s = "no CUDA driver (edgekit build stub)"; return 0; }}'
        if name in ("cuGetErrorName", "cuGetErrorString")
        else f"int {name}(void) {{ return 100; }}"  # CUDA_ERROR_NO_DEVICE
        for name in names
    ]
    stub.parent.mkdir(parents=True, exist_ok=True)
    source = stub.with_suffix(".c")
    source.write_text("\n".join(lines) + "\n")
    partial = stub.with_name(stub.name + ".partial")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(partial), str(source)],
                   check=True, capture_output=True)  # fmt: skip
    partial.replace(stub)
    return stub


def export(executable, path: Path, arch: str) -> None:
    from tvm.support import cc

    path.parent.mkdir(parents=True, exist_ok=True)
    if arch == host_arch():
        executable.export_library(str(path))
        return
    linker = CROSS_LINKERS[arch]
    if shutil.which(linker) is None:
        raise RuntimeError(f"linking for {arch} needs {linker} (Debian: apt-get install gcc-aarch64-linux-gnu)")
    executable.export_library(str(path), fcompile=cc.cross_compiler(linker))
