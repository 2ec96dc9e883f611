"""csrc/ and the CUDA backend, bit for bit against rlvr_optim.reference.

On any machine (each part skips cleanly when its compiler is missing):

- the per-element header csrc/adamw_element.cuh on the host: the CPU extension's generic
  build (rlvr_optim._cpu, every element through adamw_element, no intrinsics) against the
  reference, every mode the reference allows, odd sizes, several seeds, three steps,
  NaN/Inf grads, grad_scale and found_inf, rounding edge patterns. Its Philox4x32-10 is
  checked through the stochastic rounding these steps do (the reference's Philox meets the
  Random123 known answers, tests/test_reference_bits.py);
- a representative set of the kernel variants (CHECKED_VARIANTS), each compiled alone by
  nvcc for sm_80 and sm_90 as bench/static_report.py compiles it: ptxas reports no stack
  frame, no spill and no more registers than the launch bounds allow (every one of the 704
  variants per arch: ``python bench/static_report.py --all-variants --arch 80|90``);
- binding.cu linked with stand-in launchers into rlvr_optim._C, which imports without a
  GPU and agrees with cuda_backend.py (the real module is built and run on the GPU);
- cuda_backend's argument checks, signature and "cannot build" message.

On a GPU (``@pytest.mark.gpu``): cuda_backend.adamw against the reference on CUDA
tensors: the same matrix, lists of mixed layouts with misaligned views, many tensors in
one launch, a tensor of more than 2**31 elements, and a step replayed in a CUDA graph;
the kernels' hardware bf16 rounding against the spec on all 2**32 fp32 patterns.

Compiled artifacts are cached per source hash under ``$RLVR_OPTIM_CACHE`` (default
``~/.cache/rlvr_optim``), so only the first run pays for nvcc.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlvr_optim import cpu_backend, cuda_backend, extensions
from rlvr_optim import reference as R
from rlvr_optim.table import COUNTER_NAMES, LAYOUT_BITS, ROW_FIELDS
from rlvr_optim.bitmaps import popcount

from adamw_cases import (BETAS, EPS, FEATURES, FORM_IDS, FORMS, PATTERN_SWEEPS, fp16_edge_patterns,
                         fp32_pattern_runs, matrix, other_grad_dtype)
from adamw_cases import assert_same_bits as _assert_same_bits
from adamw_cases import bits as _bits
from adamw_cases import compare as _compare
from adamw_cases import call as _call
from adamw_cases import grad as _grad
from adamw_cases import poison as _poison

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
_spec = importlib.util.spec_from_file_location("static_report", ROOT / "bench" / "static_report.py")
S = importlib.util.module_from_spec(_spec)
sys.modules["static_report"] = S  # dataclasses look their module up there
_spec.loader.exec_module(S)
STORE_MODES = ("nearest", "stochastic", "master_nearest", "master_stochastic", "remainder")
# Per 16-bit format, x 32 combinations of the other flags (grad, state dtypes, amsgrad,
# tracking, grad_scale), x AdamW's decay or Adam's L2: bf16: fp32 params (nearest only,
# bf16 images) and bf16 params in every store mode; float16: fp32 params with float16
# images and float16 params in every store mode but the remainder form.
KERNELS_PER_ARCH = 2 * ((32 + 32 * 5) + (32 + 32 * 4))

SIZES = [1, 7, 8, 33, 4099, 2 * 2048 + 13]  # the last spans three tiles of the kernel
SEEDS = [0, 1, 2]
STEPS = 3


# ---------------------------------------------------------------------------------------
# Compiling (cached per source hash).
# ---------------------------------------------------------------------------------------


def _digest(paths, *extra) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def _cache(kind: str) -> Path:
    folder = cuda_backend._cache_root() / "test_csrc" / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _headers() -> list[Path]:
    return sorted([*CSRC.glob("*.cuh"), *CSRC.glob("*.h")])


# The variants whose ptxas report the suite checks (every variant:
# ``python bench/static_report.py --all-variants --arch 80|90``), as (16-bit format, store
# mode, flags): per launcher unit (format x store mode x param dtype) the one with the most
# live values (fp32 grads and states, amsgrad, tracking, grad_scale); the stochastic
# layouts at the 128-register cap of two blocks per SM that spilled before
# (adamw_kernel.cuh: the pipelined vector loop, shared_block_end), in both formats; and on sm_90 the tracked layouts the static report compiles
# (bench/static_report.py MODES, one compile for both, under the variant's cache lock).
_P, _G, _S, _A, _T, _GS = (S.FLAG_BITS[k] for k in ("param16", "grad16", "state_bf16",
                                                     "amsgrad", "track", "grad_scale"))
_BF16, _FP16 = S.HALF_FORMATS
_FP16_STORES = [store for store in S.STORE_MODES if store != "kRemainder"]
_HEAVIEST = [(half, "kNearest", _A | _T | _GS) for half in S.HALF_FORMATS] + [
    (_BF16, store, _P | _A | _T | _GS) for store in S.STORE_MODES] + [
    (_FP16, store, _P | _A | _T | _GS) for store in _FP16_STORES]
_AT_THE_CAP = [(half, "kStochastic", flags) for half in S.HALF_FORMATS
               for flags in (_P | _G | _S | _T | _GS, _P | _G | _T)]
_DEFAULTS = [S._variant(mode, "step") for mode in S.MODES]
CHECKED_VARIANTS = {
    "80": _HEAVIEST + _AT_THE_CAP,
    "90": list(dict.fromkeys(_HEAVIEST + _AT_THE_CAP + _DEFAULTS)),
}


@pytest.fixture(scope="module")
def variant_reports():
    """{(arch, half, store, flags): ptxas report} of CHECKED_VARIANTS, each variant compiled alone
    (in parallel, cached by source hash) as bench/static_report.py compiles it."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    try:
        tools = S.cuda_tools()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    cases = [(arch, *v) for arch, variants in CHECKED_VARIANTS.items() for v in variants]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        reports = pool.map(lambda c: S.compile_variant(*c[1:], int(c[0]), tools)[0], cases)
        return dict(zip(cases, reports))


# ---------------------------------------------------------------------------------------
# The ptxas resource report.
# ---------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
# Variant<half format, StoreMode, flags> in a mangled kernel name.
_VARIANT = re.compile(r"VariantILi(\d)EL\w*?StoreModeE(\d)ELi(\d+)E")


def _variant_name(mangled: str) -> str:
    m = _VARIANT.search(mangled)
    if m is None:
        return mangled
    half, store, flags = ("bf16", "fp16")[int(m.group(1))], int(m.group(2)), int(m.group(3))
    parts = [STORE_MODES[store], f"{half} param" if flags & 1 else f"fp32 param ({half} image)",
             f"{half} grad" if flags & 2 else "fp32 grad",
             "bf16 states" if flags & 4 else "fp32 states"]
    parts += [name for bit, name in ((8, "amsgrad"), (16, "tracking"), (32, "grad scale"),
                                     (64, "L2 decay")) if flags & bit]
    return ", ".join(parts)


def parse_ptxas(log: str) -> list[dict]:
    """One dict per function ptxas reports: name, arch, stack/spill bytes, registers."""
    functions, current, arch = [], None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            arch = m.group(2)
            current = {"name": m.group(1), "arch": arch, "entry": True, "registers": None}
            functions.append(current)
        elif m := _PROPERTIES.search(line):
            if current is None or current["name"] != m.group(1) or "stack" in current:
                current = {"name": m.group(1), "arch": arch, "entry": False, "registers": None}
                functions.append(current)
        elif (m := _FRAME.search(line)) and current is not None:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif (m := _USED.search(line)) and current is not None:
            current["registers"] = int(m.group(1))
    return functions


def test_parse_ptxas_reads_frames_spills_and_registers():
    log = (
        "ptxas info    : Compiling entry function '_ZN10rlvr_optim12adamw_kernelINS_7Variant"
        "ILi0ELNS_9StoreModeE3ELi27EEEEEvNS_10LaunchArgsE' for 'sm_80'\n"
        "ptxas info    : Function properties for _ZN10rlvr_optim12adamw_kernelINS_7VariantILi0ELNS"
        "_9StoreModeE3ELi27EEEEEvNS_10LaunchArgsE\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size\n"
        "ptxas info    : Function properties for helper\n"
        "    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    )
    kernel, helper = parse_ptxas(log)
    assert (kernel["arch"], kernel["stack"], kernel["spill_stores"], kernel["spill_loads"],
            kernel["registers"]) == ("sm_80", 8, 4, 12, 128)
    assert _variant_name(kernel["name"]) == (
        "master_stochastic, bf16 param, bf16 grad, fp32 states, amsgrad, tracking")
    assert _variant_name(kernel["name"].replace("VariantILi0E", "VariantILi1E")) == (
        "master_stochastic, fp16 param, fp16 grad, fp32 states, amsgrad, tracking")
    assert (helper["entry"], helper["stack"]) == (False, 16)


def test_checked_variants_are_variants_of_the_extension():
    """The representative set names real variants, every launcher unit (16-bit format x
    store mode x param dtype) among them on each arch."""
    every = set(S.all_variants())
    assert len(every) == KERNELS_PER_ARCH
    for arch, variants in CHECKED_VARIANTS.items():
        assert set(variants) <= every, arch
        units = {(half, store, flags & _P) for half, store, flags in variants}
        assert units == {(h, s, f & _P) for h, s, f in every}, arch


def test_checked_kernels_compile_for_sm80_and_sm90_without_spills_or_stack(variant_reports):
    bad, over, names = [], [], set()
    for (arch, half, store, flags), log in variant_reports.items():
        (kernel,) = [f for f in parse_ptxas(log) if f["entry"]]
        names.add((arch, kernel["name"]))
        assert kernel["arch"] == f"sm_{arch}" and "stack" in kernel, (arch, half, store, flags)
        variant = _variant_name(kernel["name"])
        if kernel["stack"] or kernel["spill_stores"] or kernel["spill_loads"]:
            bad.append((arch, variant, kernel["stack"], kernel["spill_stores"],
                        kernel["spill_loads"], kernel["registers"]))
        # __launch_bounds__(256, Variant::kMinBlocks): two blocks of 256 threads per
        # multiprocessor (at most 128 registers), one for amsgrad, fp32 master and remainder.
        one_block = flags & _A or store != "kNearest" and store != "kStochastic"
        if kernel["registers"] > (255 if one_block else 128):
            over.append((arch, variant, kernel["registers"]))
    assert len(names) == len(variant_reports)  # each compile holds its own variant
    assert not bad, ("local memory in (arch, variant, stack bytes, spill stores, spill loads, "
                     f"registers): {bad}")
    assert not over, f"more registers than the launch bounds allow: {over}"


# Stand-in launchers: binding.cu linked without the kernels (the variant checks above compile
# those), so that the module's host side imports and is checked on a CPU in seconds.
_STAND_INS = """// Generated by tests/test_csrc.py: stand-in launchers, no kernels.
#include <stdexcept>

#include "adamw_launch.h"

namespace rlvr_optim {
namespace {
void no_kernel(const LaunchArgs&, int, void*) {
  throw std::runtime_error("a stand-in launcher of tests/test_csrc.py: this build has no kernels");
}
// The flag combinations a launcher unit instantiates (Variant::kValid): its param dtype.
LaunchFn stand_in(int flags, bool param16) {
  if (flags < 0 || flags >= kFlagCombinations) return nullptr;
  return ((flags & kFlagParam16) != 0) == param16 ? &no_kernel : nullptr;
}
}  // namespace
"""
_LAUNCHER = re.compile(r"LaunchFn (launcher_\w+)\(int flags\);")


def stand_in_source() -> str:
    """The stand-in unit: one definition per launcher adamw_launch.h declares, taking fp32
    params in the ``launcher_fp32_param*`` units only (bf16 and float16 images), as the
    real units do."""
    names = _LAUNCHER.findall((CSRC / "adamw_launch.h").read_text())
    assert "launcher_fp32_param" in names and len(names) >= 2, names
    body = [f"LaunchFn {name}(int flags) {{ return stand_in(flags, "
            f"{'false' if name.startswith('launcher_fp32_param') else 'true'}); }}"
            for name in names]
    return _STAND_INS + "\n".join(body) + "\n}  // namespace rlvr_optim\n"


@pytest.fixture(scope="module")
def linked_ext():
    """binding.cu and the stand-in launchers linked into the extension module (the
    extension's nvcc flags, one arch), imported (no GPU needed); cached by source hash."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    if importlib.util.find_spec("pybind11") is None:
        pytest.skip("pybind11 is not installed: binding.cu cannot be compiled")
    import pybind11

    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    flags = [*cuda_backend._NVCC_FLAGS, "-gencode=arch=compute_90,code=compute_90",
             f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}", f"-I{CSRC}"]
    stand_ins = stand_in_source()
    folder = _cache("binding") / _digest([CSRC / "binding.cu", *_headers()], flags, version,
                                         stand_ins)
    target = folder / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not target.is_file():
        folder.mkdir(exist_ok=True)
        (folder / "stand_ins.cu").write_text(stand_ins)
        units = [CSRC / "binding.cu", folder / "stand_ins.cu"]
        objects = [folder / f"{unit.stem}.{os.getpid()}.o" for unit in units]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for done in pool.map(lambda uo: subprocess.run(
                    [nvcc, "-c", *flags, str(uo[0]), "-o", str(uo[1])], capture_output=True,
                    text=True), zip(units, objects)):
                assert done.returncode == 0, done.stderr[-3000:]
        partial = folder / f"_C.{os.getpid()}.tmp.so"
        subprocess.run([nvcc, "-shared", *map(str, objects), "-o", str(partial)], check=True)
        os.replace(partial, target)
    spec = importlib.util.spec_from_file_location("rlvr_optim._C", target)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    return ext


def test_extension_links_imports_without_gpu_and_matches_backend(linked_ext):
    ext = linked_ext
    assert ext.ABI_VERSION == extensions.CUDA.abi_version
    assert tuple(ext.ROW_FIELDS) == ROW_FIELDS
    assert tuple(ext.COUNTER_NAMES) == COUNTER_NAMES
    assert tuple(ext.STORE_MODES) == STORE_MODES
    assert ext.TILE_ELEMENTS % 256 == 0
    # rows + sentinel, workspace, ticket, then one int32 per tile (5 tiles: 3 int64s)
    assert ext.tile_tensor_offset(3) == 4 * len(ROW_FIELDS) + 3 * len(COUNTER_NAMES) + 1
    assert ext.table_int64s(3, 5) == ext.tile_tensor_offset(3) + 3
    assert ext.table_int64s(3, 6) == ext.tile_tensor_offset(3) + 3
    assert ext.table_int64s(3, 0) == ext.tile_tensor_offset(3)
    flags = [(g, s, a, t, c, l2) for g in (False, True) for s in (False, True)
             for a in (False, True) for t in (False, True) for c in (False, True)
             for l2 in (False, True)]
    # bf16: 16-bit params in every store mode, fp32 params nearest; float16: the same but
    # the remainder form.
    variants = {ext.variant(store, False, True, *f) for store in range(5) for f in flags}
    variants |= {ext.variant(0, False, False, *f) for f in flags}
    variants |= {ext.variant(store, True, True, *f) for store in range(4) for f in flags}
    variants |= {ext.variant(0, True, False, *f) for f in flags}
    assert len(variants) == KERNELS_PER_ARCH
    for store in range(1, 5):
        for fp16 in (False, True):
            with pytest.raises(ValueError, match="fp32 params"):
                ext.variant(store, fp16, False, False, False, False, False, False)
    with pytest.raises(ValueError, match="remainder form needs bf16"):
        ext.variant(4, True, True, False, False, False, False, False)
    with pytest.raises(ValueError, match="store mode"):
        ext.variant(5, False, True, False, False, False, False, False)
    # A grad_scale variant launched without a grad_scale is refused before any launch.
    scaled = ext.variant(0, False, True, True, True, False, False, True)
    with pytest.raises(ValueError, match="divides by grad_scale"):
        ext.launch_adamw(scaled, 1 << 20, 1, 1, False, 1 << 20, 0, 0, 0, False, 0, 0)
    # Tile indices are 32-bit in the kernel: a launch of 2**32 tiles is refused.
    plain = ext.variant(0, False, True, True, True, False, False, False)
    with pytest.raises(ValueError, match=r"fewer than 2\*\*32 tiles .* got 4294967296"):
        ext.launch_adamw(plain, 1 << 20, 1, 1 << 32, False, 1 << 20, 0, 0, 0, False, 0, 0)

    # The table of three tensors, one empty, one misaligned (built on the CPU here).
    base = 1 << 20
    columns = {
        "param": [base, base + 4096, base + 8194], "grad": [base + 16384] * 3,
        "exp_avg": [base] * 3, "exp_avg_sq": [base] * 3,
        "change_bitmap": [base, base + 32, base + 65], "freeze_mask": [0, base + 4, base],
        "numel": [5000, 0, 2049],
        "element_offset": [0, 0, 7], "scalar_row": [4, 5, 6],
    }
    table = cuda_backend._build_table(ext, columns, columns["numel"], torch.device("cpu"))
    assert (table.num_tensors, table.total_tiles, table.counters) == (3, 3 + 0 + 2, False)
    rows = table.buffer[: 4 * 16].reshape(4, 16)
    col = {name: i for i, name in enumerate(ext.ROW_FIELDS)}
    assert rows[:, col["first_tile"]].tolist() == [0, 3, 3, 5]
    # 8194 and 65: not aligned; a freeze mask at +4 is not 8-byte aligned (no vector path).
    vector, bitmap = LAYOUT_BITS["vector_aligned"], LAYOUT_BITS["bitmap_aligned"]
    assert rows[:3, col["layout"]].tolist() == [vector | bitmap, vector, 0]
    assert rows[:3, col["scalar_row"]].tolist() == [4, 5, 6]
    assert rows[3].tolist()[: col["first_tile"]] == [0] * col["first_tile"]
    start = ext.tile_tensor_offset(3)
    assert not table.buffer[4 * 16: start].any()  # workspace and ticket start at zero
    assert len(table.buffer) == ext.table_int64s(3, 5)
    # Each tile's tensor; the empty tensor 1 owns no tile.
    assert table.buffer[start:].view(torch.int32)[:5].tolist() == [0, 0, 0, 2, 2]


def test_tile_tensor_section_is_what_the_binary_search_found(linked_ext):
    """The tile -> tensor section against the search it replaced (the last row whose
    first_tile <= tile), on random groups with empty tensors, one tensor and odd sizes."""
    ext, tile = linked_ext, linked_ext.TILE_ELEMENTS
    rng = np.random.default_rng(7)
    groups = [[1], [0, 1], [tile], [tile + 1, 0, 0, 3]]
    groups += [rng.choice([0, 1, tile - 1, tile, 5 * tile + 3, 40000], size=n).tolist()
               for n in (2, 9, 57, 300)]
    for numels in groups:
        n = len(numels)
        columns = {"param": [1 << 20] * n, "numel": numels}
        table = cuda_backend._build_table(ext, columns, numels, torch.device("cpu"))
        width = len(ROW_FIELDS)
        rows = table.buffer[: (n + 1) * width].reshape(n + 1, width)
        first = rows[:, ROW_FIELDS.index("first_tile")].numpy()
        start = ext.tile_tensor_offset(n)
        got = table.buffer[start:].view(torch.int32)[: table.total_tiles].numpy()
        want = np.searchsorted(first[:n], np.arange(table.total_tiles), side="right") - 1
        assert got.tolist() == want.tolist(), numels
        assert all(numels[t] > 0 for t in got)
        assert len(table.buffer) == ext.table_int64s(n, table.total_tiles)


class _RecordingExtension:
    """The linked extension with ``launch_adamw`` recording its arguments instead of
    launching: the host path of cuda_backend.adamw runs on CPU tensors."""

    def __init__(self, ext):
        self._ext = ext
        self.launches = []

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def launch_adamw(self, variant, table, num_tensors, total_tiles, counters, *rest):
        self.launches.append((table, num_tensors, total_tiles, counters))


def test_host_path_checks_once_and_follows_moved_tensors(linked_ext, monkeypatch):
    """cuda_backend.adamw on CPU tensors with the launch recorded: a repeated call reuses
    its checks and its table; new grad storage, a param whose ``.data`` was swapped and a
    tensor replaced in a list each get a table with the new address; a bad grad after
    cached calls is named."""
    recorder = _RecordingExtension(linked_ext)
    monkeypatch.setattr(cuda_backend, "load_extension", lambda: recorder)
    monkeypatch.setattr(cuda_backend, "_POLICY", cuda_backend._POLICY._replace(
        check_device=lambda i, param: None))
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
    planner = cuda_backend.planner
    planner.clear()
    col = {name: i for i, name in enumerate(ROW_FIELDS)}
    sizes = [3000, 17, 5]
    params = [torch.zeros(n, dtype=torch.bfloat16) for n in sizes]
    params[2] = params[2].float()  # a second layout: two launches
    exp_avgs = [torch.zeros(n, dtype=p.dtype) for n, p in zip(sizes, params)]
    exp_avg_sqs = [torch.zeros(n, dtype=p.dtype) for n, p in zip(sizes, params)]
    scalars = R.step_scalars(torch.ones(3), 1e-3, 0.9, 0.999, 0.0, 1e-8)

    def call(grads):
        recorder.launches.clear()
        cuda_backend.adamw(params, grads, exp_avgs, exp_avg_sqs, scalars=scalars)
        buffers = {launch.table.buffer.data_ptr(): launch.table.buffer
                   for launch in planner.calls[0].last[2]}
        return [buffers[table][: count * len(col)].reshape(count, len(col))
                for table, count, _, _ in recorder.launches]

    def addresses(rows, name):
        return sorted(int(v) for r in rows for v in r[:, col[name]])

    grads = [torch.zeros(n, dtype=p.dtype) for n, p in zip(sizes, params)]
    rows = call(grads)
    assert len(rows) == 2 and planner.builds == 1
    assert addresses(rows, "grad") == sorted(g.data_ptr() for g in grads)
    assert addresses(rows, "param") == sorted(p.data_ptr() for p in params)
    call(grads)
    assert planner.builds == 1 and len(planner.calls) == 1  # reused
    # New gradient storage: new tables (both groups), same checked call.
    grads = [g.clone() for g in grads]
    rows = call(grads)
    assert addresses(rows, "grad") == sorted(g.data_ptr() for g in grads)
    assert planner.builds == 2 and len(planner.calls) == 1
    # A param's storage swapped under the same object: a new check and a new table.
    params[0].data = params[0].data.clone()
    rows = call(grads)
    assert params[0].data_ptr() in addresses(rows, "param")
    # A state replaced in the same list object.
    exp_avgs[1] = exp_avgs[1].clone()
    rows = call(grads)
    assert exp_avgs[1].data_ptr() in addresses(rows, "exp_avg")
    # Bad grads after cached calls: the full checks run and name the tensor.
    with pytest.raises(ValueError, match=r"grads\[1\] has 16 elements, expected 17"):
        call([grads[0], grads[1][:16], grads[2]])
    with pytest.raises(ValueError, match=r"grads\[0\] is not contiguous"):
        call([torch.zeros(6000, dtype=torch.bfloat16)[::2], grads[1], grads[2]])
    # Kept calls hold no tensor: dropping the tensors frees them and empties the cache.
    watched = weakref.ref(exp_avgs[0])
    del params, exp_avgs, exp_avg_sqs, grads, call
    gc.collect()
    assert watched() is None and len(planner.calls) == 0


def test_setup_and_backend_compile_with_the_same_nvcc_flags():
    """Both take them from rlvr_optim/extensions.py (setup.py loads it by path as RECIPES)."""
    from rlvr_optim import extensions

    assert "[*RECIPES.NVCC_FLAGS," in (ROOT / "setup.py").read_text()
    assert cuda_backend._NVCC_FLAGS is extensions.NVCC_FLAGS
    assert "-fmad=false" in extensions.NVCC_FLAGS


# ---------------------------------------------------------------------------------------
# Backends with the reference's signature: the header on the host, and the CUDA backend.
# ---------------------------------------------------------------------------------------


@pytest.fixture
def header_on_host(monkeypatch):
    """``adamw`` of the header compiled for the host: the CPU extension pinned to its
    generic build, where every element goes through adamw_element (the AVX2 build has
    loops of intrinsics for the default layouts). A call whose tensors the reference would
    step instead (none of these tests make one) fails, so nothing passes by the reference."""
    reason = cpu_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    ext = cpu_backend.load_extension()

    class Generic:
        ISAS = ("generic",)

        def __getattr__(self, name):
            return getattr(ext, name)

    monkeypatch.setattr(extensions.CPU, "module", Generic())

    def adamw(*args, **kwargs):
        cpu_backend.adamw(*args, **kwargs)
        launches = cpu_backend.planner.calls[0].last[2]
        assert not any(isinstance(launch, cpu_backend._ReferenceLaunch) for launch in launches), \
            "the reference stepped a tensor"

    return adamw


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def target(request):
    """Where the code under test runs: the header on the host, or the CUDA kernels."""
    if request.param == "host":
        adamw = request.getfixturevalue("header_on_host")
        return SimpleNamespace(adamw=adamw, device=torch.device("cpu"))
    device = request.getfixturevalue("cuda_device")
    return SimpleNamespace(adamw=cuda_backend.adamw, device=device)


# ---------------------------------------------------------------------------------------
# Inputs and comparisons.
# ---------------------------------------------------------------------------------------


def _values(gen, numel, dtype, device, scale=1.0, nonneg=False):
    x = torch.randn(numel, generator=gen) * scale
    if nonneg:
        x = x.abs()
    x[torch.rand(numel, generator=gen) < 0.05] = 0.0  # exact zeros
    return x.to(dtype).to(device)


def _random_bytes(gen, count, device):
    return torch.randint(0, 256, (count,), generator=gen, dtype=torch.uint8).to(device)


def _make_state(gen, numel, param_dtype, state_dtype, master, *, amsgrad=False, freeze=False,
                track=True, device=torch.device("cpu")):
    """Fresh inputs of one tensor (the same values feed the reference and the target)."""
    nbytes = (numel + 7) // 8
    s = {
        "param": _values(gen, numel, param_dtype, device),
        "exp_avg": _values(gen, numel, state_dtype, device, 0.05),
        "exp_avg_sq": _values(gen, numel, state_dtype, device, 1e-3, nonneg=True),
    }
    if track:
        s["change_bitmap"] = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        s["cumulative_bitmap"] = _random_bytes(gen, nbytes, device)  # padding bits too
        s["counters"] = torch.zeros(3, dtype=torch.int64, device=device)
    if amsgrad:
        extra = _values(gen, numel, torch.float32, device, 1e-5, nonneg=True)
        s["max_exp_avg_sq"] = (s["exp_avg_sq"].float() + extra).to(state_dtype)
    if master is not None:
        p = s["param"].float()
        w = p + torch.randn(numel, generator=gen).to(device) * p.abs() * 2.0**-8
        if master == "fp32":
            s["master"] = w
        else:  # the state a remainder run holds: the split of an fp32 value
            hi, remainder = R.split_remainder(R.fp32_bits(w))
            s["param"] = R.bf16_from_bits(hi)
            s["remainder"] = remainder.to(torch.int16)
    if freeze:
        s["freeze_mask"] = _random_bytes(gen, nbytes, device)  # random padding bits too
    return s


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


# ---------------------------------------------------------------------------------------
# The matrix: every form x state dtype x feature set, sizes by a covering design (every
# size on every form, state dtype and feature set; the rest: -m exhaustive), several seeds,
# three steps.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form,state_dtype,features,numel", matrix(SIZES, shift=3))
def test_matches_reference_bit_for_bit(target, form, state_dtype, features, numel):
    param_dtype, master, rounding, change_dtype = form
    f = FEATURES[features]
    device = target.device
    track = f.get("track", True)
    grad_dtype = param_dtype
    if f.get("other_grad_dtype"):
        grad_dtype = other_grad_dtype(param_dtype, change_dtype)
    changed_total = 0
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed * 7919 + numel)
        lr, weight_decay = [(1e-2, 0.1), (2e-3, 0.01), (5e-3, 0.0)][seed % 3]
        ref = _make_state(gen, numel, param_dtype, state_dtype, master, amsgrad=f.get("amsgrad", False),
                          freeze=f.get("freeze", False), track=track, device=device)
        got = _clone(ref)
        scale = f.get("grad_scale")
        for step in range(1, STEPS + 1):
            grad = _grad(gen, numel, grad_dtype, device, scale or 1.0, f.get("nonfinite", False))
            steps = torch.tensor([step], device=device)
            found_inf = f.get("found_inf")
            kwargs = dict(
                scalars=R.step_scalars(steps, lr, *BETAS, weight_decay, EPS,
                                       decoupled_weight_decay=not f.get("l2_decay", False)),
                rounding=rounding, amsgrad=f.get("amsgrad", False),
                sr_keys=(R.stochastic_rounding_keys(1000 + seed, steps, torch.tensor([17], device=device))
                         if rounding == "stochastic" else None),
                element_offsets=[f["element_offset"]] if "element_offset" in f else None,
                maximize=f.get("maximize", False),
                decoupled_weight_decay=not f.get("l2_decay", False),
                grad_scale=torch.tensor(scale, device=device) if scale else None,
                found_inf=torch.tensor(found_inf[step - 1], device=device) if found_inf else None,
                change_dtype=change_dtype,
            )
            _poison(ref, gen)
            _poison(got, gen)
            _call(R.adamw, [ref], [grad.clone()], **kwargs)
            _call(target.adamw, [got], [grad.clone()], **kwargs)
            _compare(ref, got, f"seed {seed} step {step}")
            if track:
                changed_total += int(ref["counters"][0])
    if numel >= 33 and track:
        assert changed_total > 0  # the comparison saw 16-bit changes


# ---------------------------------------------------------------------------------------
# Rounding edges through the whole step: with lr = 0, w stays as it was, so the stored
# param is the rounding (or split) of edge patterns.
# ---------------------------------------------------------------------------------------


def _edge_fp32_patterns() -> np.ndarray:
    exponents = np.array([0, 1, 0x7F, 0x80, 0xFE], dtype=np.uint64) << 23
    high = np.array([0, 1, 0x7E, 0x7F], dtype=np.uint64) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint64)
    sign = np.array([0, 0x80000000], dtype=np.uint64)
    grid = (sign[:, None, None, None] | exponents[None, :, None, None]
            | high[None, None, :, None] | low[None, None, None, :]).reshape(-1)
    specials = np.array([
        0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7FC00000,
        0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA12345, 0x00008000,
        0x00018000, 0x80008000, 0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,
    ], dtype=np.uint64)
    randoms = np.random.default_rng(3).integers(0, 2**32, size=200, dtype=np.uint64)
    return np.concatenate([grid, specials, randoms]).astype(np.uint32)


@pytest.mark.parametrize("master,rounding,half", [
    ("fp32", "nearest", "bf16"), ("fp32", "stochastic", "bf16"), ("remainder", "nearest", "bf16"),
    (None, "nearest", "bf16"), (None, "stochastic", "bf16"),
    ("fp32", "nearest", "fp16"), ("fp32", "stochastic", "fp16"), (None, "nearest", "fp16"),
    (None, "stochastic", "fp16")])
def test_rounding_edge_patterns(target, master, rounding, half):
    """``half``: the 16-bit format (bf16 or float16) of the param, or of an fp32 param's
    change image; float16 cases take float16's edges (subnormals, overflow, ties)."""
    device = target.device
    fp16 = half == "fp16"
    patterns = fp16_edge_patterns() if fp16 else _edge_fp32_patterns()
    numel = patterns.size
    w = torch.from_numpy(patterns.view(np.float32).copy()).to(device)
    gen = torch.Generator().manual_seed(9)
    param16 = torch.float16 if fp16 else torch.bfloat16
    param_dtype = param16 if master is not None or rounding == "stochastic" else torch.float32
    ref = _make_state(gen, numel, param_dtype, torch.float32, master, device=device)
    w_bits = torch.from_numpy(patterns.astype(np.int64))
    if master == "fp32":
        ref["master"] = w.clone()
    elif master == "remainder":
        ref["param"] = R.bf16_from_bits(w_bits >> 16).to(device)
        edges = torch.tensor([-(2**15), -1, 0, 1, 2**15 - 1, -(2**14)], dtype=torch.int16)
        ref["remainder"] = edges.repeat(numel // 6 + 1)[:numel].to(device)
    elif param_dtype == torch.float32:
        ref["param"] = w.clone()  # fp32 params: the change bit compares nearest-even images
    elif fp16:  # stored float16 params at every edge (NaN payloads, subnormals, inf)
        ref["param"] = R.fp16_from_bits(R.fp32_to_fp16_bits_nearest(w_bits)).to(device)
    else:
        ref["param"] = R.bf16_from_bits(w_bits >> 16).to(device)
    got = _clone(ref)
    steps = torch.tensor([1], device=device)
    kwargs = dict(scalars=R.step_scalars(steps, 0.0, *BETAS, 0.0, EPS), rounding=rounding,
                  sr_keys=R.stochastic_rounding_keys(4, steps, torch.tensor([2], device=device)),
                  change_dtype=torch.float16 if fp16 else torch.bfloat16)
    grad = _grad(gen, numel, param_dtype, device)
    _poison(ref, gen)
    _poison(got, gen)
    _call(R.adamw, [ref], [grad.clone()], **kwargs)
    _call(target.adamw, [got], [grad.clone()], **kwargs)
    _compare(ref, got, "edge patterns")
    if master == "fp32":
        assert int(ref["counters"][0]) > numel // 2  # the edges reached the param store


@pytest.mark.parametrize("which", PATTERN_SWEEPS)
def test_fp16_nearest_formula_equals_torch_cast_on_all_fp32_patterns(which):
    """The header's float16 nearest-even formula (round_nearest_fp16, the spec's integer
    formula: reference.fp32_to_fp16_bits_nearest agrees with it in every step test) equals
    torch's cast on every one of the 2**32 fp32 patterns (``all``, the exhaustive run; the
    default run sweeps ``sample``: every dropped-bit value at every exponent, see
    adamw_cases.fp32_pattern_runs), NaNs included (torch keeps the sign and top payload
    bits of a NaN, quieted, as the spec does); the formula on OpenMP threads in the CPU
    extension. Negative control: the same comparison with truncation (the stochastic
    formula with zero random bits) fails."""
    reason = cpu_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    ext = cpu_backend.load_extension()
    threads = max(1, torch.get_num_threads())
    for first, count in fp32_pattern_runs(which):
        signed = first - 2**32 if first >= 2**31 else first  # runs never cross 2**31
        patterns = torch.arange(signed, signed + count, dtype=torch.int32)
        cast = patterns.view(torch.float32).half().view(torch.int16)
        formula = torch.empty(count, dtype=torch.int16)
        ext.fp16_nearest_patterns(formula.data_ptr(), first, count, threads)
        if not torch.equal(cast, formula):
            bad = int((cast != formula).nonzero()[0])
            raise AssertionError(
                f"fp32 {first + bad:#010x}: formula "
                f"{int(formula[bad]) & 0xFFFF:#06x}, torch {int(cast[bad]) & 0xFFFF:#06x}")
    # The control, on 2**16 ordinary values from 1.0 up.
    patterns = torch.arange(0x3F800000, 0x3F810000, dtype=torch.int32)
    truncated = R.fp32_to_fp16_bits_stochastic(patterns.to(torch.int64), torch.tensor([0]))
    cast = patterns.view(torch.float32).half().view(torch.int16).to(torch.int64) & 0xFFFF
    assert not torch.equal(cast, truncated)


# ---------------------------------------------------------------------------------------
# found_inf of other dtypes and values; a skipped step.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("found_inf", [
    torch.tensor(True), torch.tensor(False), torch.tensor([1], dtype=torch.int32),
    torch.tensor(float("nan")), torch.tensor(-0.0), torch.tensor(1e-300, dtype=torch.float64),
    torch.tensor(1.0, dtype=torch.bfloat16),
], ids=["bool-true", "bool-false", "int32-one", "nan", "minus-zero", "fp64-tiny", "bf16-one"])
def test_found_inf_values_and_dtypes(target, found_inf):
    device = target.device
    numel = 300
    gen = torch.Generator().manual_seed(12)
    ref = _make_state(gen, numel, torch.bfloat16, torch.float32, None, amsgrad=True, freeze=True,
                      device=device)
    got = _clone(ref)
    grad = _grad(gen, numel, torch.bfloat16, device, 1.0, nonfinite=True)
    steps = torch.tensor([2], device=device)
    kwargs = dict(scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS), amsgrad=True,
                  grad_scale=torch.tensor(0.5, dtype=torch.float64), found_inf=found_inf.to(device))
    _poison(ref, gen)
    _poison(got, gen)
    before = _clone(ref)
    _call(R.adamw, [ref], [grad.clone()], **kwargs)
    _call(target.adamw, [got], [grad.clone()], **kwargs)
    _compare(ref, got, "found_inf")
    skipped = bool(found_inf.to(torch.float64) != 0)
    if skipped:
        for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "cumulative_bitmap"):
            assert torch.equal(_bits(got[key]), _bits(before[key])), key
        assert not got["change_bitmap"].any()
        assert got["counters"][:2].tolist() == [0, 0]
    else:
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert not torch.equal(_bits(got[key]), _bits(before[key])), key
    assert int(got["counters"][2]) > 0  # non-finite grads are counted on a skipped step too


def test_negative_control_wrong_element_offset_is_caught(header_on_host):
    """The comparison can fail: another element offset draws other random bits."""
    numel = 2000
    gen = torch.Generator().manual_seed(1)
    ref = _make_state(gen, numel, torch.bfloat16, torch.float32, "fp32")
    got = _clone(ref)
    grad = _grad(gen, numel, torch.bfloat16, torch.device("cpu"))
    steps = torch.tensor([1])
    kwargs = dict(scalars=R.step_scalars(steps, 1e-3, *BETAS, 0.0, EPS), rounding="stochastic",
                  sr_keys=R.stochastic_rounding_keys(0, steps, torch.tensor([0])))
    _call(R.adamw, [ref], [grad.clone()], element_offsets=[100], **kwargs)
    _call(header_on_host, [got], [grad.clone()], element_offsets=[101], **kwargs)
    _assert_same_bits("master", ref["master"], got["master"])
    with pytest.raises(AssertionError, match="param"):
        _assert_same_bits("param", ref["param"], got["param"])


# ---------------------------------------------------------------------------------------
# cuda_backend without a GPU: signature, argument errors, extension loading.
# ---------------------------------------------------------------------------------------


def test_signature_is_the_reference_signature():
    ref = inspect.signature(R.adamw).parameters
    ours = inspect.signature(cuda_backend.adamw).parameters
    assert list(ours) == list(ref)
    for name, p in ref.items():
        assert ours[name].kind == p.kind and ours[name].default == p.default, name


def _one_tensor_call(**overrides):
    n = 16
    steps = torch.tensor([1])
    args = dict(
        params=[torch.randn(n).bfloat16()], grads=[torch.randn(n).bfloat16()],
        exp_avgs=[torch.zeros(n)], exp_avg_sqs=[torch.zeros(n)],
        scalars=R.step_scalars(steps, 1e-3, *BETAS, 0.0, EPS),
    )
    args.update(overrides)
    return args


def test_cpu_tensors_are_refused_with_a_pointer_to_the_reference():
    args = _one_tensor_call()
    with pytest.raises(ValueError, match="CUDA tensors only"):
        cuda_backend.adamw(args.pop("params"), args.pop("grads"), args.pop("exp_avgs"),
                           args.pop("exp_avg_sqs"), **args)


def test_no_way_to_build_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(extensions.CUDA, "module", None)
    monkeypatch.setattr(extensions.CUDA, "failure", None)
    monkeypatch.setattr(extensions.CUDA, "prebuilt", lambda: None)
    monkeypatch.setattr(extensions, "nvcc", lambda: None)
    reason = cuda_backend.unavailable_reason()
    assert reason is not None and "nvcc" in reason
    with pytest.raises(RuntimeError, match="nvcc is not on PATH.*backend='triton' or 'reference'"):
        cuda_backend.load_extension()


def test_found_inf_operand_skips_exactly_when_the_reference_does():
    cpu = torch.device("cpu")
    for value in [torch.tensor(1e-300, dtype=torch.float64), torch.tensor(float("nan")),
                  torch.tensor(-0.0), torch.tensor(0, dtype=torch.int64), torch.tensor(True),
                  torch.tensor(2**40, dtype=torch.int64), torch.tensor(0.0, dtype=torch.bfloat16)]:
        operand = cuda_backend._found_inf_operand(value, cpu)
        assert operand.dtype == torch.float32 and operand.numel() == 1
        assert bool(operand[0] != 0) == bool(value.reshape(()) != 0), value


# ---------------------------------------------------------------------------------------
# GPU only: what a single-tensor matrix cannot show.
# ---------------------------------------------------------------------------------------


def _step_both(ref, got, grads, gen, label, **kwargs):
    """One step of the reference on `ref` and of the CUDA backend on `got` (outputs poisoned
    first), then every tensor compared bit for bit; label(i) names tensor i."""
    for s in ref + got:
        _poison(s, gen)
    _call(R.adamw, ref, [g.clone() for g in grads], **kwargs)
    _call(cuda_backend.adamw, got, [g.clone() for g in grads], **kwargs)
    for i, (r, g) in enumerate(zip(ref, got)):
        _compare(r, g, label(i))


@pytest.mark.gpu
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cuda_tensor_lists_mixed_layouts_and_misaligned_views(cuda_device, rounding):
    """Several layouts (one launch each), per-entry None, multi-tile tensors, and tensors
    that are views at odd offsets of flat buffers (element-wise loads, byte bitmaps)."""
    gen = torch.Generator().manual_seed(5)
    sizes = [(3, 5), (2048,), (2049,), (2, 3, 7), (1,), (0,), (6000,), (4096,), (33,)]
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32,
              torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16]
    ref = []
    for i, (shape, dtype) in enumerate(zip(sizes, dtypes)):
        numel = int(np.prod(shape))
        master = "fp32" if dtype == torch.bfloat16 and i % 3 != 2 else None
        state_dtype = torch.bfloat16 if i % 4 == 1 else torch.float32
        s = _make_state(gen, numel, dtype, state_dtype, master, amsgrad=True, freeze=i % 2 == 0,
                        device=cuda_device)
        if i == 3:
            del s["change_bitmap"]  # per-entry None for an output
        if i == 6:
            del s["counters"]
        for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master"):
            if key in s:
                s[key] = s[key].reshape(shape)
        ref.append(s)
    # Views at odd element / byte offsets of flat buffers: not 16-byte (4-byte) aligned.
    for i in (2, 6, 8):
        for key, value in list(ref[i].items()):
            if key == "counters":
                continue
            flat = torch.empty(value.numel() + 3, dtype=value.dtype, device=cuda_device)
            view = flat[1: 1 + value.numel()].view(value.shape)
            view.copy_(value)
            ref[i][key] = view
    got = []
    for s in ref:  # the same layout (views of fresh buffers) for the kernel
        copy = {}
        for key, value in s.items():
            if value.storage_offset():
                flat = torch.empty(value.numel() + 3, dtype=value.dtype, device=cuda_device)
                copy[key] = flat[1: 1 + value.numel()].view(value.shape)
                copy[key].copy_(value)
            else:
                copy[key] = value.clone()
        got.append(copy)
    n = len(ref)
    for step in (1, 2, 3):
        grads = [_grad(gen, s["param"].numel(), torch.bfloat16 if j % 2 else torch.float32,
                       cuda_device, 1.0, nonfinite=True).reshape(s["param"].shape)
                 for j, s in enumerate(ref)]
        steps = torch.arange(n, device=cuda_device) + step
        kwargs = dict(
            scalars=R.step_scalars(steps, 5e-3, *BETAS, 0.05, EPS), amsgrad=True,
            rounding=rounding,
            sr_keys=R.stochastic_rounding_keys(2**63 + 11, steps, torch.arange(n, device=cuda_device) * 3 + 1),
            element_offsets=[0, 15, 2**40, 7, 0, 0, 2**33 - 5, 9, 1],
        )
        _step_both(ref, got, grads, gen, lambda i: f"tensor {i} step {step}", **kwargs)


@pytest.mark.gpu
def test_hardware_bf16_rounding_equals_spec_on_all_fp32_patterns(cuda_device):
    # The kernels round computed values with cvt.rn.bf16(x2).f32 and set NaN lanes to
    # 0x7FC0; the spec is the integer formula. Seconds on a GPU.
    ext = cuda_backend.load_extension()
    index = cuda_device.index if cuda_device.index is not None else torch.cuda.current_device()
    mismatches, first = ext.bf16_rounding_check(index)
    assert mismatches == 0, f"{mismatches} patterns differ, first {first:#010x}"
    # Negative control: against truncation the same comparison fails.
    control, _ = ext.bf16_rounding_check(index, control=True)
    assert control > 2**30


@pytest.mark.gpu
def test_hardware_fp16_rounding_equals_spec_on_all_fp32_patterns(cuda_device):
    # The kernels round computed values to float16 with cvt.rn.f16.f32 and set NaN lanes to
    # 0x7E00; the spec is the integer formula (round_nearest_fp16).
    ext = cuda_backend.load_extension()
    index = cuda_device.index if cuda_device.index is not None else torch.cuda.current_device()
    mismatches, first = ext.fp16_rounding_check(index)
    assert mismatches == 0, f"{mismatches} patterns differ, first {first:#010x}"
    # Negative control: against truncation the same comparison fails.
    control, _ = ext.fp16_rounding_check(index, control=True)
    assert control > 2**30


@pytest.mark.gpu
def test_cuda_many_tensors_in_one_launch(cuda_device):
    """Hundreds of tensors of one layout: blocks walk across tensors, counters add up."""
    gen = torch.Generator().manual_seed(8)
    sizes = torch.randint(0, 9000, (300,), generator=gen).tolist() + [2048, 100_000, 0, 1]
    ref = [_make_state(gen, numel, torch.bfloat16, torch.float32, "fp32", freeze=i % 5 == 0,
                       device=cuda_device) for i, numel in enumerate(sizes)]
    got = [_clone(s) for s in ref]
    n = len(ref)
    for step in (1, 2):
        grads = [_grad(gen, s["param"].numel(), torch.bfloat16, cuda_device) for s in ref]
        steps = torch.full((n,), step, device=cuda_device)
        kwargs = dict(scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS), rounding="stochastic",
                      sr_keys=R.stochastic_rounding_keys(3, steps, torch.arange(n, device=cuda_device)))
        _step_both(ref, got, grads, gen, lambda i: f"tensor {i} step {step}", **kwargs)
    assert sum(int(s["counters"][0]) for s in ref) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["bf16-states", "fp32-states"])
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_cuda_every_full_tile_count_and_runs_that_split_tensors(cuda_device, form, state_dtype):
    """The vector path's pipelined loop (two load buffers, the loop unrolled by two): tensors
    of 1 to 9 full tiles with and without a partial one, so that a run ends on either buffer
    and on a tile with or without a next one, and enough tiles that the blocks' runs start
    and end inside tensors. No amsgrad, so the two-blocks-per-SM variants run."""
    param_dtype, master, rounding = form
    gen = torch.Generator().manual_seed(31)
    tile = 2048
    sizes = [k * tile + r for k in range(1, 10) for r in (0, 5)] + [600 * tile + 7, 100_000, 4099]
    ref = [_make_state(gen, numel, param_dtype, state_dtype, master, freeze=i % 3 == 0,
                       device=cuda_device) for i, numel in enumerate(sizes)]
    got = [_clone(s) for s in ref]
    n = len(ref)
    for step in (1, 2, 3, 4):
        grads = [_grad(gen, numel, torch.bfloat16 if param_dtype == torch.bfloat16 else torch.float32,
                       cuda_device, 1.0, nonfinite=True) for numel in sizes]
        steps = torch.full((n,), step, device=cuda_device)
        kwargs = dict(scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS), rounding=rounding,
                      sr_keys=R.stochastic_rounding_keys(9, steps, torch.arange(n, device=cuda_device)),
                      maximize=step == 3)
        if step == 2:
            kwargs["grad_scale"] = torch.tensor(4.0, device=cuda_device)
        if step == 4:  # a skipped step: every store dead, non-finite grads still counted
            kwargs["found_inf"] = torch.tensor(1.0, device=cuda_device)
        _step_both(ref, got, grads, gen,
                   lambda i: f"tensor {i} ({sizes[i]} elements) step {step}", **kwargs)
        changed = sum(int(s["counters"][0]) for s in ref)
        assert changed == 0 if step == 4 else changed > 0  # a bitmap of zeros proves little


@pytest.mark.gpu
def test_cuda_tensor_over_2_31_elements(cuda_device):
    """64-bit indexing: windows of a 2**31 + 4101 element tensor (one before and one across
    element 2**31, one at the end) equal the reference run on copies of those windows with
    their element offsets. About 18 GB of GPU memory."""
    numel = 2**31 + 4101
    gen = torch.Generator(device=cuda_device).manual_seed(2)
    param = torch.empty(numel, dtype=torch.bfloat16, device=cuda_device).normal_(generator=gen)
    grad = torch.empty_like(param).normal_(generator=gen)
    exp_avg = torch.empty_like(param).normal_(0, 0.05, generator=gen)
    exp_avg_sq = torch.empty_like(param).normal_(0, 1e-3, generator=gen).abs_()
    bitmap = torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=cuda_device)
    counters = torch.zeros(3, dtype=torch.int64, device=cuda_device)
    windows = [(2**31 - 2**20, 2**31 - 2**20 + 4096), (2**31 - 1024, 2**31 + 1024),
               (numel - 4101, numel)]
    before = [{"param": param[a:b].clone(), "exp_avg": exp_avg[a:b].clone(),
               "exp_avg_sq": exp_avg_sq[a:b].clone(),
               "change_bitmap": torch.zeros((b - a + 7) // 8, dtype=torch.uint8, device=cuda_device),
               "counters": torch.zeros(3, dtype=torch.int64, device=cuda_device)}
              for a, b in windows]
    steps = torch.tensor([4], device=cuda_device)
    scalars = R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS)
    keys = R.stochastic_rounding_keys(77, steps, torch.tensor([3], device=cuda_device))
    cuda_backend.adamw([param], [grad], [exp_avg], [exp_avg_sq], scalars=scalars,
                       change_bitmaps=[bitmap], counters=[counters], rounding="stochastic",
                       sr_keys=keys)
    for (a, b), window in zip(windows, before):
        R.adamw([window["param"]], [grad[a:b].clone()], [window["exp_avg"]], [window["exp_avg_sq"]],
                scalars=scalars, change_bitmaps=[window["change_bitmap"]],
                counters=[window["counters"]], rounding="stochastic", sr_keys=keys,
                element_offsets=[a])
        label = f"window [{a}, {b})"
        _assert_same_bits(f"{label}: param", window["param"], param[a:b])
        _assert_same_bits(f"{label}: exp_avg", window["exp_avg"], exp_avg[a:b])
        _assert_same_bits(f"{label}: exp_avg_sq", window["exp_avg_sq"], exp_avg_sq[a:b])
        _assert_same_bits(f"{label}: change_bitmap", window["change_bitmap"], bitmap[a // 8: (b + 7) // 8])
    assert int(counters[0]) == int(popcount(bitmap)) > numel // 4


@pytest.mark.gpu
def test_cuda_graph_replay_is_bit_exact(cuda_device):
    """A captured step replays with new step scalars, keys and grads from device memory."""
    gen = torch.Generator().manual_seed(4)
    sizes = [5000, 7, 2048, 33, 0]
    ref = [_make_state(gen, numel, torch.bfloat16, torch.float32, "fp32", amsgrad=True,
                       freeze=i == 1, device=cuda_device) for i, numel in enumerate(sizes)]
    got = [_clone(s) for s in ref]
    n = len(sizes)
    grads = [torch.zeros(numel, dtype=torch.bfloat16, device=cuda_device) for numel in sizes]
    scalars = torch.zeros(n, 8, device=cuda_device)
    keys = torch.zeros(n, 2, dtype=torch.int64, device=cuda_device)
    found_inf = torch.zeros((), device=cuda_device)
    kwargs = dict(scalars=scalars, sr_keys=keys, rounding="stochastic", amsgrad=True,
                  found_inf=found_inf)

    def load_inputs(step, skip):
        steps = torch.full((n,), step, device=cuda_device)
        scalars.copy_(R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS))
        keys.copy_(R.stochastic_rounding_keys(11, steps, torch.arange(n, device=cuda_device)))
        found_inf.fill_(1.0 if skip else 0.0)
        for g, numel in zip(grads, sizes):
            g.copy_(_grad(gen, numel, torch.bfloat16, cuda_device))

    def reference_step():
        _call(R.adamw, ref, [g.clone() for g in grads], **kwargs)

    load_inputs(1, False)  # warm-up outside the graph: builds the cached table
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _call(cuda_backend.adamw, got, grads, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    reference_step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call(cuda_backend.adamw, got, grads, **kwargs)
    for step, skip in ((2, False), (3, True), (4, False)):
        load_inputs(step, skip)
        for s in ref + got:
            _poison(s, gen)
        graph.replay()
        reference_step()
        for i, (r, g) in enumerate(zip(ref, got)):
            _compare(r, g, f"tensor {i} replay of step {step}")


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_cuda_equals_triton_backend(cuda_device, form):
    """The two fused backends give the same bits (each also equals the reference above)."""
    triton_adamw = pytest.importorskip("rlvr_optim.triton_kernels.adamw").adamw
    param_dtype, master, rounding = form
    gen = torch.Generator().manual_seed(21)
    sizes = [4099, 2048, 1, 6000]
    cuda = [_make_state(gen, numel, param_dtype, torch.float32, master, amsgrad=True,
                        freeze=i % 2 == 0, device=cuda_device) for i, numel in enumerate(sizes)]
    tri = [_clone(s) for s in cuda]
    n = len(sizes)
    for step in (1, 2):
        grads = [_grad(gen, numel, torch.bfloat16, cuda_device, 2.0, nonfinite=True) for numel in sizes]
        steps = torch.full((n,), step, device=cuda_device)
        kwargs = dict(scalars=R.step_scalars(steps, 1e-2, *BETAS, 0.1, EPS), amsgrad=True,
                      rounding=rounding, maximize=step == 2,
                      sr_keys=R.stochastic_rounding_keys(5, steps, torch.arange(n, device=cuda_device)),
                      element_offsets=[0, 99, 2**32, 8], grad_scale=torch.tensor(2.0, device=cuda_device))
        for s in cuda + tri:
            _poison(s, gen)
        _call(cuda_backend.adamw, cuda, [g.clone() for g in grads], **kwargs)
        _call(triton_adamw, tri, [g.clone() for g in grads], **kwargs)
        for i, (c, t) in enumerate(zip(cuda, tri)):
            _compare(t, c, f"tensor {i} step {step} (triton first)")
