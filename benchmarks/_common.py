"""What the benchmark scripts share: the run header (machine, versions), timing, peak memory, tables, plots.

Conventions (every script):
- every number is the median of `--repeats` runs; the variants of one case are run interleaved (A, B, C, A, B, C,
  ...) so that a drift of the machine hits all of them alike, and every ratio is computed from medians of the same
  run, never across runs or machines;
- the p20-p80 spread of the runs is printed next to the median, so the reader sees the noise;
- peak memory on CPU is the peak of live bytes allocated by torch's CPU allocator during the call, read from the
  allocation events of `torch.profiler` (profile_memory=True) in a separate, untimed call. It counts every tensor
  (activations, KV cache, gradients) and nothing outside torch's allocator (oneDNN/BLAS scratch, Python objects).
  On CUDA it is `torch.cuda.max_memory_allocated()` minus what was allocated before the call. Both are reported
  as "weights + peak during the call" so that the CPU and GPU columns mean the same thing.
"""

import datetime
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LOAD_AT_START = os.getloadavg()[0]
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# timm without torchvision
# ---------------------------------------------------------------------------------------------------------


class _Unavailable(type):
    """Metaclass of the stand-ins for torchvision objects: attribute access gives another stand-in (so module-level
    code such as `{InterpolationMode.NEAREST: "nearest"}` evaluates), calling one raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(
            f"{cls.__qualname__} belongs to torchvision, which is not importable in this environment (see "
            "benchmarks/README.md); the benchmarks only use timm's RegNet blocks, which never call it"
        )


def _stand_in(qualname):
    return _Unavailable(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: (
            _stand_in(f"{spec.name}.{name}") if not name.startswith("__") else _raise(name)
        )
        module.__version__ = "0+stub"
        return module

    def exec_module(self, module):
        pass


def _raise(name):
    raise AttributeError(name)


TORCHVISION_NOTE = None


def import_timm():
    """Import timm (0.9.8 in .venvs/bench); returns the module.

    timm imports torchvision at import time (data transforms, datasets, FrozenBatchNorm2d), though RegStage never
    uses it. PyPI has no CPU torchvision for torch 2.13 (its 0.28.0 wheel is a CUDA build whose _C.so needs
    libtorch_cuda.so), so when `import torchvision` fails, a stand-in package is registered whose objects raise
    if they are ever called; the timm code under test is unchanged. With a working torchvision (a GPU machine) the
    real one is used. `TORCHVISION_NOTE` says which happened.
    """
    global TORCHVISION_NOTE
    try:
        import torchvision  # noqa: F401

        TORCHVISION_NOTE = f"torchvision {torchvision.__version__}"
    except Exception as error:  # ImportError, or the RuntimeError/OSError of a CUDA wheel on CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchvisionStub())
        TORCHVISION_NOTE = f"torchvision stand-in (real import failed: {type(error).__name__})"
    import timm
    import timm.models.regnet  # noqa: F401

    return timm


# ---------------------------------------------------------------------------------------------------------
# the run header
# ---------------------------------------------------------------------------------------------------------


def import_package_module(name):
    """`honeybee_hf.<name>`. Where the package is not installed (a bare GPU box), the repository root is registered
    as the package `honeybee_hf` first: its flat modules import each other relatively, as on the Hub."""
    if importlib.util.find_spec("honeybee_hf") is None:
        package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("honeybee_hf", None, is_package=True))
        package.__path__ = [str(REPO)]
        sys.modules["honeybee_hf"] = package
    return importlib.import_module(f"honeybee_hf.{name}")


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _git_commit():
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty += subprocess.run(
            ["git", "status", "--porcelain", "--", "benchmarks/*.py"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return commit + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_description(device):
    if device.type == "meta":
        return f"none (meta device; counted on {_cpu_name()})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
            f"host {_cpu_name()}, {os.cpu_count()} cores"
        )
    threads = torch.get_num_threads()
    return (
        f"{_cpu_name()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB RAM, "
        f"{threads} torch thread{'s' if threads > 1 else ''}"
    )


def header(title, device, dtype, command, extra=()):
    """Markdown lines stating what ran where: put on top of every table."""
    import transformers

    versions = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    for name in ("timm", "triton"):
        module = sys.modules.get(name)
        if module is not None:
            versions.append(f"{name} {module.__version__}")
    if TORCHVISION_NOTE:
        versions.append(TORCHVISION_NOTE)
    lines = [
        f"## {title}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_description(device)}; {platform.system()} {platform.release()}",
        f"- versions: {', '.join(versions)}; honeybee_hf at {_git_commit()}",
        f"- device {device}, dtype {str(dtype).replace('torch.', '')}; "
        f"date {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine load (1-min load average) at start {LOAD_AT_START:.2f}, at end {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} cores; this run adds up to {torch.get_num_threads()} itself, more means other processes "
        "competed for the cores)",
        *[f"- {line}" for line in extra],
        "",
    ]
    return lines


def command_line():
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


# ---------------------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------------------


# wall-clock, and the CPU time of this process (all its threads): the latter is blind to other processes taking the
# cores, which on a shared machine is most of the noise; on a GPU it means nothing (the work is asynchronous).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds of one call of fn (synchronised), and its result."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median(values):
    return statistics.median(values)


def median_and_runs(values, digits):
    """`median (run, run, ...)`, each with `digits` decimals."""
    return f"{median(values):.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def spread(values):
    """(p20, p80) of the runs."""
    if len(values) < 2:
        return values[0], values[0]
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
    return pick(0.2), pick(0.8)


def peak_memory_bytes(fn, device):
    """Peak bytes allocated by torch during fn() above what was live before it (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    # Frees of blocks allocated before the profiler started carry no size and are not counted; so release what
    # the call would free (stale gradients, outputs) before calling this, or the peak is overstated.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def tensor_bytes(module):
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def peak_rss_gib():
    """The process's resident-memory high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------


def table(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fmt_ms(seconds, runs=None):
    text = f"{seconds * 1e3:.1f}" if seconds * 1e3 >= 10 else f"{seconds * 1e3:.2f}"
    if runs:
        lo, hi = spread(runs)
        text += f" ({lo * 1e3:.3g}–{hi * 1e3:.3g})"
    return text


def fmt_mib(nbytes):
    return f"{nbytes / 2**20:,.1f}"


def write_report(lines, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def setup_threads(threads):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)


def pyplot():
    """matplotlib with a file-only backend, or None (plots are skipped) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("matplotlib is not installed: no plot (run benchmarks/setup_bench_env.sh)", file=sys.stderr)
        return None


def parse_dtype(name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
