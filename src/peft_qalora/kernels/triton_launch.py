# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Launching a jitted Triton kernel without the JIT's argument binding on every call.

Eager decoding is bound by the CPU (benchmarks/results/gpu.md, issue 14): a merged layer's call is one or two Triton
launches, and ``JITFunction.run`` binds every argument, computes its specialization key and looks the compiled kernel
up on each of them before the launch itself. A :class:`CachedLaunch` is one kernel with a fixed grid, fixed
constexprs and fixed scalar arguments, called again and again with other tensors: the first call of each
specialization goes through the JIT, which compiles or finds the kernel, and later calls make only the JIT's last
step, ``CompiledKernel.run(grid, stream, ..., *arguments)``, with the same arguments and hooks.

A cached kernel is only launched where the JIT would pick the same one: what the caller fixes (constexprs, scalars,
the dtypes of every tensor and the addresses of the tensors it does not name as varying) is fixed for the object's
life, and the varying tensors are keyed by their address modulo 16 (the JIT's alignment specialization) and by the
current device. Needs Triton 3.3 or newer (``triton.knobs``, and a launcher that takes every argument, constexprs
included); elsewhere, under the interpreter, or with :func:`set_direct_launch` off, every call goes through the JIT.
"""

from __future__ import annotations

try:  # Triton is optional: CPU installs may not have it
    from triton import knobs
    from triton.runtime.driver import driver

    _AVAILABLE = hasattr(knobs, "runtime")
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the install
    _AVAILABLE = False

_DIRECT = True


def set_direct_launch(enabled: bool) -> None:
    """Launch cached compiled kernels directly (default) or let every call go through Triton's JIT (for comparison)."""
    global _DIRECT
    _DIRECT = bool(enabled)


class CachedLaunch:
    """``kernel[grid](*args, **constexprs)`` for calls whose only change is the tensors at positions ``varying``.

    The caller keeps everything else the same across calls: scalar arguments, the other tensors' addresses (or at
    least their alignment), every tensor's dtype. ``constexprs`` holds every parameter after the positional ones, by
    name, and may hold launch options (``num_warps``, ``num_stages``).
    """

    __slots__ = ("kernel", "grid", "constexprs", "varying", "_compiled")

    def __init__(self, kernel, grid: tuple[int, int, int], constexprs: dict, varying: tuple[int, ...]) -> None:
        self.kernel = kernel
        self.grid = grid
        self.constexprs = constexprs
        self.varying = varying
        self._compiled: dict[tuple, tuple[object, tuple]] = {}  # (device, alignments) -> (kernel, constexpr values)

    @property
    def compiled_variants(self) -> int:
        """How many specializations are launched directly (0: every call so far went through the JIT)."""
        return len(self._compiled)

    def __call__(self, *args) -> None:
        if not (_DIRECT and _AVAILABLE and args[0].is_cuda):
            self.kernel[self.grid](*args, **self.constexprs)
            return
        device = driver.active.get_current_device()  # what the JIT launches on
        key = (device, *[args[i].data_ptr() & 15 for i in self.varying])
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self.kernel[self.grid](*args, **self.constexprs)
            names = self.kernel.arg_names[len(args) :]
            # not the interpreter's, and no omitted defaults (the JIT fills them in: leave those calls to it)
            if hasattr(compiled, "packed_metadata") and all(name in self.constexprs for name in names):
                self._compiled[key] = (compiled, tuple(self.constexprs[name] for name in names))
            return
        compiled, tail = entry
        grid = self.grid
        stream = driver.active.get_current_stream(device)
        arguments = (*args, *tail)
        metadata = compiled.launch_metadata(grid, stream, *arguments)  # what profiling hooks read
        compiled.run(
            grid[0],
            grid[1],
            grid[2],
            stream,
            compiled.function,
            compiled.packed_metadata,
            metadata,
            knobs.runtime.launch_enter_hook,
            knobs.runtime.launch_exit_hook,
            *arguments,
        )
