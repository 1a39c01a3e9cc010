"""Run this interpreter's torch and vLLM code as on an x86 CPU with AVX2 but no AVX-512.

``bench/flowrun.py --isa avx2`` puts this folder first on ``PYTHONPATH`` of the ``flowlane run``
it starts, so every Python process of the run (learner, rollout workers, vLLM's engine processes)
imports it at start-up, together with two settings the libraries read themselves:
``ATEN_CPU_CAPABILITY=avx2`` (torch's own kernels) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's
GEMMs). vLLM picks its kernels (``vllm._C_AVX2`` instead of ``_C``/``_C_AVX512``, the attention
and linear paths) by asking ``torch.cpu._is_avx512_supported()`` and its siblings, which read the
hardware; this hook makes them answer False once ``torch.cpu`` is imported. Nothing else is
touched: a process that never imports torch (the sandbox) is unaffected.

What stays different from a real AVX2-only machine: the core itself (clock, caches, memory
bandwidth), so a run here measures the AVX2 code paths, not an AVX2 machine.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType
from typing import Any

#: torch.cpu's hardware questions that steer vLLM onto AVX-512 / AMX code (AVX2 itself stays True).
WIDER_THAN_AVX2 = ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported",
                   "_is_amx_tile_supported", "_is_amx_fp16_supported", "_init_amx")


def _answer_no(module: ModuleType) -> None:
    for name in WIDER_THAN_AVX2:
        if hasattr(module, name):
            setattr(module, name, lambda: False)


class _PatchTorchCpu(importlib.abc.MetaPathFinder):
    """Finds ``torch.cpu`` as usual, then patches it right after it executes."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "torch.cpu":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                _patch_after_exec(spec.loader)
                return spec
        return None


def _patch_after_exec(loader: Any) -> None:
    original = loader.exec_module

    def exec_module(module: ModuleType) -> None:
        original(module)
        _answer_no(module)

    loader.exec_module = exec_module


sys.meta_path.insert(0, _PatchTorchCpu())
