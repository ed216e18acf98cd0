"""Compiled kernels: built once by numba, loaded in later processes by llvmlite alone.

The index kernels (:mod:`ctzarr.write.index_builder`) are plain Python functions over numpy
arrays, compiled by numba. Loading them from numba's own on-disk cache still costs a process
~0.47 s holding the GIL (``import numba`` 0.14 s, then the first call installs numba's whole
typing and lowering registry, 0.28 s, measured), while the conversion's reader and writer
threads wait for the GIL: a per-case ``ctzarr convert`` paid it on every case. numba has no
public way to load its machine code without that registry (its ahead-of-time compiler,
``numba.pycc``, needs a C compiler and is deprecated), so this module does it by hand:

- **Build** (once per kernel, argument types and CPU): numba compiles a ``cfunc`` around the
  kernel that takes each array as a data pointer and its shape (C-contiguous arrays only);
  llvmlite turns numba's optimised LLVM IR into a native object for this CPU, which is written
  to the cache directory (atomically) with the kernel's symbol name.
- **Load** (every later process): llvmlite's MCJIT links the cached object (~0.05 s with the
  llvmlite import) and :mod:`ctypes` calls it, with the GIL released for the call.

The object refers to a few numba runtime functions on paths that raise a Python exception from
inside the kernel. The kernels cannot raise (no ``raise``, no bounds checks, numpy's error
model for division), so those symbols are bound to stubs that trap. Every other external symbol
must resolve in this process, checked before linking, or the kernel is built afresh.

The cache key covers the kernel's module source, the argument types, Python's and llvmlite's
versions and the CPU (name and features); a file that is unreadable, fails its checksum or
names a symbol this process lacks is rebuilt. When
llvmlite cannot be used at all the kernel runs through numba's own dispatcher, as before.

Cache directory: ``NUMBA_CACHE_DIR`` when set, else the package's ``__pycache__`` (next to
numba's own cache files) when writable, else ``$XDG_CACHE_HOME/ctzarr`` (``~/.cache/ctzarr``).
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import logging
import marshal
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: bumped when the cache file's layout or the wrapper's calling convention changes
_CACHE_FORMAT = 1

#: numba runtime symbols an object may name on its exception paths (never taken: see above)
_TRAPPED = (
    "numba_gil_ensure",
    "numba_gil_release",
    "numba_do_raise",
    "numba_unpickle",
    "numba_runtime_build_excinfo_struct",
    "numba_attempt_nocopy_reshape",
    "NRT_Free",
    "NRT_MemInfo_call_dtor",
    "NRT_MemInfo_alloc_safe_aligned",
)

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, tuple[Any, ...]], Callable[..., None]] = {}
_ENGINES: list[Any] = []  # llvmlite MCJIT engines holding the loaded code


def call(kernel: Callable[..., None], *args: Any) -> None:
    """Run ``kernel(*args)`` compiled: numpy arrays (C-contiguous), ints and bools.

    The compiled code for these argument types is loaded (or built) on first use and kept for
    the life of the process.
    """
    signature = tuple(_arg_type(a) for a in args)
    key = (f"{kernel.__module__}.{kernel.__qualname__}", signature)
    fn = _LOADED.get(key)
    if fn is None:
        with _LOCK:
            fn = _LOADED.get(key)
            if fn is None:
                fn = _LOADED[key] = _load_or_build(kernel, signature)
    fn(*args)


def _arg_type(a: Any) -> tuple[Any, ...]:
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise TypeError("compiled kernels take C-contiguous arrays only")
        return ("array", a.ndim, a.dtype.str)
    if isinstance(a, (bool, np.bool_)):
        return ("bool",)
    if isinstance(a, (int, np.integer)):
        return ("int",)
    raise TypeError(f"compiled kernels take arrays, ints and bools, not {type(a).__name__}")


# -- the native path ----------------------------------------------------------------------------
def _load_or_build(kernel: Callable[..., None], signature: tuple[Any, ...]) -> Callable[..., None]:
    """The kernel as a native function, from the cache or built now; numba's dispatcher when
    llvmlite cannot load it."""
    try:
        llvm = _llvm()
        key = _cache_key(kernel, signature, llvm)
        name = f"{kernel.__name__}-{key}.ctzk"
        for directory in _cache_dirs():
            entry = _read_entry(directory / name)
            if entry is not None:
                fn = _link(llvm, entry, signature)
                if fn is not None:
                    return fn
        entry = _build(kernel, signature, llvm)
        _write_entry(name, entry)
        fn = _link(llvm, entry, signature)
        if fn is not None:
            return fn
    except Exception:  # any failure of the native path: numba's own, slower to load, path
        logger.debug("native kernel %s unavailable", kernel.__name__, exc_info=True)
    return _numba_dispatcher(kernel)


def _llvm() -> Any:
    import llvmlite.binding as llvm

    return llvm


def _cache_key(kernel: Callable[..., None], signature: tuple[Any, ...], llvm: Any) -> str:
    """What the machine code depends on: the kernel's module source (the kernel and the module
    constants numba freezes into it), the argument types, Python, llvmlite and the CPU."""
    import llvmlite

    try:
        source = Path(inspect.getsourcefile(kernel) or "").read_bytes()
    except (OSError, TypeError):  # no source file (frozen or .pyc-only installs)
        source = marshal.dumps(kernel.__code__)
    parts = [
        str(_CACHE_FORMAT),
        hashlib.sha256(source).hexdigest(),
        kernel.__qualname__,
        repr(signature),
        sys.version,
        llvmlite.__version__,
        llvm.get_process_triple(),
        llvm.get_host_cpu_name(),
        llvm.get_host_cpu_features().flatten(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _cache_dirs() -> list[Path]:
    """Where cache files are looked for, in order (the first writable one is written)."""
    dirs = []
    if os.environ.get("NUMBA_CACHE_DIR"):
        dirs.append(Path(os.environ["NUMBA_CACHE_DIR"]) / "ctzarr")
    else:
        dirs.append(Path(__file__).resolve().parent / "__pycache__")
        xdg = os.environ.get("XDG_CACHE_HOME")
        dirs.append((Path(xdg) if xdg else Path("~/.cache").expanduser()) / "ctzarr")
    return dirs


def _read_entry(path: Path) -> tuple[str, bytes, list[str]] | None:
    """(symbol, object code, external symbols it names) of a cache file, or None when it is
    missing or damaged (the object's SHA-256 is checked before LLVM ever sees it)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head, sep, obj = data.partition(b"\n\n")
    lines = head.decode("ascii", "replace").split("\n")
    if not sep or len(lines) < 3 or lines[0] != f"ctzarr-kernel {_CACHE_FORMAT}":
        return None
    if hashlib.sha256(obj).hexdigest() != lines[2]:
        logger.debug("kernel cache file %s is damaged; rebuilt", path)
        return None
    return lines[1], obj, [s for s in lines[3:] if s]


def _write_entry(name: str, entry: tuple[str, bytes, list[str]]) -> None:
    symbol, obj, externals = entry
    head = [f"ctzarr-kernel {_CACHE_FORMAT}", symbol, hashlib.sha256(obj).hexdigest(), *externals]
    data = "\n".join(head).encode() + b"\n\n" + obj
    for directory in _cache_dirs():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".ctzk")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                Path(tmp).replace(directory / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return
        except OSError:
            continue
    logger.debug("no writable cache directory for kernel %s", name)


def _build(
    kernel: Callable[..., None], signature: tuple[Any, ...], llvm: Any
) -> tuple[str, bytes, list[str]]:
    """Compile the kernel with numba as a C-ABI function and emit it as a native object."""
    from numba import cfunc, njit, types
    from numba.np.numpy_support import carray, from_dtype

    inner = njit(nogil=True, error_model="numpy")(kernel)
    params: list[str] = []
    argtypes: list[Any] = []
    body: list[str] = []
    call_args: list[str] = []
    for i, t in enumerate(signature):
        if t[0] == "array":
            _, ndim, dtype = t
            dims = [f"n{i}_{d}" for d in range(ndim)]
            params += [f"p{i}", *dims]
            pointer = types.CPointer(from_dtype(np.dtype(dtype)))  # type: ignore[no-untyped-call]
            argtypes += [pointer, *[types.int64] * ndim]
            body.append(f"    a{i} = carray(p{i}, ({', '.join(dims)},))")
            call_args.append(f"a{i}")
        else:
            params.append(f"p{i}")
            argtypes.append(types.boolean if t[0] == "bool" else types.int64)
            call_args.append(f"p{i}")
    # numba compiles a function of fixed parameters: the wrapper is generated for this signature
    source = (
        f"def wrapper({', '.join(params)}):\n"
        + "".join(line + "\n" for line in body)
        + f"    inner({', '.join(call_args)})\n"
    )
    namespace: dict[str, Any] = {"carray": carray, "inner": inner}
    exec(compile(source, f"<ctzarr kernel {kernel.__name__}>", "exec"), namespace)
    as_cfunc: Any = cfunc
    compiled = as_cfunc(types.void(*argtypes), nopython=True, nogil=True, error_model="numpy")(
        namespace["wrapper"]
    )
    module = llvm.parse_assembly(compiled.inspect_llvm())
    module.verify()
    externals = {f.name for f in module.functions if f.is_declaration} | {
        g.name for g in module.global_variables if g.is_declaration
    }
    obj = _target_machine(llvm).emit_object(module)
    return compiled.native_name, obj, sorted(externals)


def _target_machine(llvm: Any) -> Any:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(
        cpu=llvm.get_host_cpu_name(),
        features=llvm.get_host_cpu_features().flatten(),
        opt=3,
        reloc="pic",
        codemodel="jitdefault",
    )


def _link(
    llvm: Any, entry: tuple[str, bytes, list[str]], signature: tuple[Any, ...]
) -> Callable[..., None] | None:
    """Link a cached object in an engine of its own; its function, or None if it cannot.

    One engine per object: objects built by different processes reuse numba's internal symbol
    names (numbered per process) for different functions, which one shared engine would bind
    to the first definition it saw.
    """
    symbol, obj, externals = entry
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _target_machine(llvm))
    # An unresolved symbol aborts the process in LLVM's linker (it does not raise): every name
    # the object needs must be a stub or known to this process before the object is added.
    wanted = [n for n in externals if not n.startswith("llvm.")]
    missing = [n for n in wanted if n not in _TRAPPED and llvm.address_of_symbol(n) is None]
    if missing:
        logger.debug("kernel %s needs %s, not in this process", symbol, missing)
        return None
    stubs = [n for n in wanted if n in _TRAPPED]
    if stubs:
        module = llvm.parse_assembly(
            "declare void @llvm.trap()\n"
            + "".join(
                f"define void @{n}() {{\n  call void @llvm.trap()\n  unreachable\n}}\n"
                for n in stubs
            )
        )
        module.verify()
        engine.add_module(module)
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    address = engine.get_function_address(symbol)
    if not address:
        return None
    fn = _ctypes_function(address, signature)
    _ENGINES.append(engine)  # the code lives as long as its engine
    return fn


def _ctypes_function(address: int, signature: tuple[Any, ...]) -> Callable[..., None]:
    argtypes: list[Any] = []
    for t in signature:
        if t[0] == "array":
            argtypes += [ctypes.c_void_p] + [ctypes.c_int64] * t[1]
        elif t[0] == "bool":
            argtypes.append(ctypes.c_bool)
        else:
            argtypes.append(ctypes.c_int64)
    # CFUNCTYPE (not PYFUNCTYPE): the GIL is released for the call
    native = ctypes.CFUNCTYPE(None, *argtypes)(address)

    def run(*args: Any) -> None:
        flat: list[Any] = []
        for a in args:
            if isinstance(a, np.ndarray):
                flat.append(a.ctypes.data)
                flat.extend(a.shape)
            else:
                flat.append(a)
        native(*flat)

    run.native = native  # type: ignore[attr-defined]  # keeps the ctypes object alive
    return run


def _numba_dispatcher(kernel: Callable[..., None]) -> Callable[..., None]:
    import numba

    fn: Callable[..., None] = numba.njit(nogil=True, cache=True)(kernel)
    return fn


def loaded_natively(kernel: Callable[..., None], args: Sequence[Any]) -> bool:
    """Whether ``kernel`` for these argument types runs from the native cache (tests)."""
    key = (f"{kernel.__module__}.{kernel.__qualname__}", tuple(_arg_type(a) for a in args))
    fn = _LOADED.get(key)
    return fn is not None and hasattr(fn, "native")
