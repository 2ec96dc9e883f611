"""The measurements of "The Path Not Taken" (arXiv 2511.08567) on pairs of checkpoints.

A checkpoint is read one tensor at a time (HF model folders, safetensors files, torch
``.bin``/``.pt`` state dicts, in-memory state dicts or modules), so a pair of 7B models is
compared with two tensors in memory at once.

Measures:

* update sparsity: the share of elements whose 16-bit bits are identical in both
  checkpoints: bf16 and float16 tensors compare their own bits, fp32 tensors their
  nearest-even images in ``image_dtype`` (bf16 by default, what a bf16 checkpoint of them
  would hold, or float16, as the optimizer's ``change_dtype``), per tensor, module type,
  layer and overall, with the bits each tensor was compared on; beside
  it the absolute-tolerance variant of earlier work, ``|w1 - w0| <= 1e-5``
  (:func:`unchanged_relative` explains why the paper's relative test is bit equality);
* principal mask (top-``alpha`` of ``|rank-k SVD reconstruction of W0|``) and
  low-magnitude mask (bottom-``alpha`` of ``|W0|``), and the overlap of an update mask with
  them against the random baseline and against a magnitude-matched null (the update mask
  permuted within bins of ``|W0|``, :func:`matched_overlap`), and the paper's split of the
  principal weights that are not low-magnitude;
* Jaccard similarity of two update masks against independent Bernoulli masks of the same
  densities; spectrum drift; principal angles between top-k singular subspaces, each also
  per unit of relative update size;
* masks for freezing runs, saved as packed bitmaps that :func:`apply_freeze_masks` (or
  ``AdamW.set_freeze_mask``) loads.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from . import bitmaps, files
from .errors import InputError

__all__ = [
    "ABSOLUTE_TOLERANCE",
    "MASK_KINDS",
    "SPARSITY_REPORT_FILES",
    "Checkpoint",
    "apply_freeze_masks",
    "IMAGE_DTYPES",
    "bf16_bits",
    "build_masks",
    "compared_dtype",
    "compared_line",
    "format_geometry",
    "format_sparsity",
    "geometry",
    "geometry_rows",
    "image_bits",
    "jaccard",
    "jaccard_from_counts",
    "layer_index",
    "load_pyplot",
    "load_masks",
    "load_state_dict",
    "low_magnitude_mask",
    "magnitude_bins",
    "markdown_table",
    "matched_overlap",
    "module_key",
    "open_checkpoint",
    "open_safetensors",
    "overlap",
    "pack_mask",
    "parse_rank",
    "principal_angles",
    "principal_mask",
    "resolve_rank",
    "save_masks",
    "spectrum_drift",
    "summarize",
    "top_fraction",
    "top_update_mask",
    "unchanged_absolute",
    "unchanged_bitwise",
    "unchanged_relative",
    "update_jaccard",
    "update_sparsity",
    "write_sparsity_report",
]

# The tolerance of Mukherjee et al. 2025 ("RL finetunes small subnetworks"): a weight counts
# as unchanged when it moved by at most 1e-5, whatever its magnitude.
ABSOLUTE_TOLERANCE = 1e-5

MASK_KINDS = ("principal", "non_principal", "low_magnitude", "principal_or_low_magnitude", "random")
# What write_sparsity_report may write into its folder (the plots need matplotlib, the
# second one a geometry result).
SPARSITY_REPORT_FILES = ("sparsity.md", "sparsity.json", "sparsity_per_layer.png",
                         "overlap_vs_random.png")

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CHUNK = 1 << 24
_SAFETENSORS_FLOATS = {"F16", "BF16", "F32", "F64"}


# --------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """A read-only, tensor-at-a-time view of a checkpoint.

    Args:
        source: a state dict (name -> tensor), a ``torch.nn.Module``, a ``.safetensors``
            file, a torch ``.bin``/``.pt``/``.pth`` state dict (memory-mapped), or a folder
            with ``model.safetensors``, sharded safetensors (with or without their
            ``*.index.json``) or ``pytorch_model*.bin`` files.

    Only floating-point tensors are listed by :meth:`names`; :meth:`get` returns a CPU tensor.
    A path that is not a checkpoint, or a weight file that cannot be read, raises
    :class:`~rlvr_optim.errors.InputError` naming the file.
    """

    def __init__(self, source: Any) -> None:
        self.description = _describe(source)
        self._handles: list[Any] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        if isinstance(source, torch.nn.Module):
            source = source.state_dict()
        if isinstance(source, Mapping):
            tensors = {k: v for k, v in source.items()
                       if isinstance(v, Tensor) and v.dtype in _FLOAT_DTYPES}
            self._getter: Callable[[str], Tensor] = lambda name: tensors[name].detach().cpu()
            self._shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            return
        path = os.fspath(source)
        files = _checkpoint_files(path)
        folder = path if os.path.isdir(path) else None
        if files[0].endswith(".safetensors"):
            self._open_safetensors(files, folder)
        else:
            self._open_torch(files, folder)

    def _open_safetensors(self, files: list[str], folder: str | None) -> None:
        owner: dict[str, Any] = {}
        for file in files:
            handle = open_safetensors(file, folder=folder)
            self._handles.append(handle)
            for name in handle.keys():
                sl = handle.get_slice(name)
                if sl.get_dtype() in _SAFETENSORS_FLOATS:
                    owner[name] = handle
                    self._shapes[name] = tuple(sl.get_shape())
        self._getter = lambda name: owner[name].get_tensor(name)

    def _open_torch(self, files: list[str], folder: str | None) -> None:
        tensors: dict[str, Tensor] = {}
        for file in files:
            for k, v in _load_torch_file(file, folder).items():
                if isinstance(v, Tensor) and v.dtype in _FLOAT_DTYPES:
                    tensors[k] = v
        self._shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        self._getter = tensors.__getitem__

    def names(self) -> list[str]:
        """Names of the floating-point tensors, in file order."""
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> Tensor:
        """Load one tensor (CPU)."""
        return self._getter(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(source: Any) -> Checkpoint:
    """A :class:`Checkpoint` of ``source`` (returned as is if it already is one)."""
    return source if isinstance(source, Checkpoint) else Checkpoint(source)


def load_state_dict(source: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor (any dtype) of a checkpoint file or folder, as :class:`Checkpoint` finds them.

    For whole-checkpoint work such as :func:`rlvr_optim.patch.make_patch`; safetensors
    tensors are read into memory, torch files are memory-mapped. Errors as in
    :class:`Checkpoint`.
    """
    path = os.fspath(source)
    folder = path if os.path.isdir(path) else None
    tensors: dict[str, Tensor] = {}
    for file in _checkpoint_files(path):
        if file.endswith(".safetensors"):
            handle = open_safetensors(file, folder=folder)
            tensors.update((k, handle.get_tensor(k)) for k in handle.keys())
        else:
            tensors.update((k, v) for k, v in _load_torch_file(file, folder).items()
                           if isinstance(v, Tensor))
    return tensors


def open_safetensors(path: str | os.PathLike, *, folder: str | None = None):
    """``safetensors.safe_open(path, framework="pt")``, with errors that name the file.

    Args:
        path: a ``.safetensors`` file.
        folder: the checkpoint folder the file was found in (default None), named in the
            message, since a stray file there is read as part of the checkpoint.

    Raises :class:`~rlvr_optim.errors.InputError` when ``path`` is missing, a folder, or
    not a safetensors file (empty, truncated, another format).
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; expected a .safetensors file")
    if not os.path.isfile(path):
        raise InputError(f"no file at {path}")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc}); "
                         f"{_bad_file_hint(folder)}") from None


def _load_torch_file(file: str, folder: str | None) -> Mapping[str, Any]:
    """The state dict in a torch ``.bin``/``.pt``/``.pth`` file, memory-mapped."""
    try:
        loaded = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # torch's messages run over several lines (the weights_only one over a dozen).
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise InputError(f"{file} is not a readable torch state dict ({first}); "
                         f"{_bad_file_hint(folder)}") from None
    if not isinstance(loaded, Mapping):
        raise InputError(f"{file} holds a {type(loaded).__name__}, not a state dict (a dict "
                         f"of name -> tensor); {_bad_file_hint(folder)}")
    return loaded


def _bad_file_hint(folder: str | None) -> str:
    if folder is None:
        return "save or download it again"
    return (f"every weight file in {folder} is read as part of the checkpoint: move this one "
            "out if it does not belong, or pass the weights file itself")


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return type(source).__name__


def _checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint file or folder (safetensors preferred)."""
    if os.path.isfile(path):
        if path.endswith((".safetensors", ".bin", ".pt", ".pth")):
            return [path]
        raise InputError(f"{path}: expected a .safetensors, .bin, .pt or .pth file, or an HF "
                         "model folder")
    if not os.path.isdir(path):
        if os.path.lexists(path):  # a symbolic link loop, or one to nothing: say which
            os.stat(path)
        raise InputError(f"no checkpoint file or folder at {path}")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            return _indexed_files(path, index_path)
    entries = sorted(os.listdir(path))
    for suffix in (".safetensors", ".bin", ".pt", ".pth"):
        found = [os.path.join(path, e) for e in entries
                 if e.endswith(suffix) and not e.startswith("training_args")]
        if found:
            return found
    raise InputError(
        f"{path} holds no .safetensors, .bin, .pt or .pth weight files (expected an HF model "
        "folder, a safetensors file or a state dict)"
    )


def _indexed_files(folder: str, index_path: str) -> list[str]:
    """The shard files an HF ``*.index.json`` lists, each checked to be a file of the
    folder (a name that leads out of it, ``../x`` or ``/x``, is refused) and to exist."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map is not an object of strings")
        names = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{index_path} is not an HF weight index (a JSON object with a "
                         f"'weight_map' of tensor name -> file): {exc!r}") from None
    if not names:
        raise InputError(f"{index_path} lists no weight files")
    for name in names:
        # Lexically, not by resolving links: HF's cache folders link each shard to a blob
        # outside the folder, and that is fine; an index that names another folder is not.
        inside = os.path.normpath(name)
        if (not name or os.path.isabs(name) or inside == os.curdir
                or inside.split(os.sep)[0] == os.pardir or "\0" in name):
            raise InputError(f"{index_path} names the weight file {name!r}, which is not in "
                             f"{folder}; an index may name only files of its own folder")
    shards = [os.path.join(folder, n) for n in names]
    missing = [f for f in shards if not os.path.isfile(f)]
    if missing:
        raise InputError(f"{index_path} lists {len(missing)} shard file(s) that {folder} lacks, "
                         f"e.g. {os.path.basename(missing[0])}")
    return shards


def _common_tensors(base: Checkpoint, tuned: Checkpoint) -> tuple[list[str], list[dict]]:
    """Names to compare (base order) and the skipped ones with the reason."""
    tuned_names = set(tuned.names())
    names, skipped = [], []
    for name in base.names():
        if name not in tuned_names:
            skipped.append({"name": name, "reason": "only in base"})
        elif base.shape(name) != tuned.shape(name):
            skipped.append({"name": name, "reason": f"shape {base.shape(name)} vs "
                                                   f"{tuned.shape(name)}"})
        else:
            names.append(name)
    base_names = set(base.names())
    skipped += [{"name": n, "reason": "only in tuned"} for n in tuned.names()
                if n not in base_names]
    return names, skipped


def _comparable_tensors(base: Checkpoint, tuned: Checkpoint) -> tuple[list[str], list[dict]]:
    """:func:`_common_tensors`, refusing (InputError) a pair with no tensor to compare.

    Measures over nothing would read as "100% unchanged".
    """
    names, skipped = _common_tensors(base, tuned)
    if names:
        return names, skipped
    for ckpt in (base, tuned):
        if not ckpt.names():
            raise InputError(f"{ckpt.description} holds no floating-point tensors: nothing "
                             "to compare")
    reshaped = [s for s in skipped if s["reason"].startswith("shape")]
    if reshaped:
        raise InputError(f"every tensor that {base.description} and {tuned.description} share "
                         f"differs in shape ({len(reshaped)}, e.g. {reshaped[0]['name']}: "
                         f"{reshaped[0]['reason']}): compare checkpoints of one model")
    raise InputError(f"{base.description} and {tuned.description} have no tensor name in "
                     f"common (e.g. {base.names()[0]!r} and {tuned.names()[0]!r}): compare "
                     "checkpoints of one model")


def _skipped_warning(skipped: Sequence[Mapping], compared: int) -> str | None:
    """One line on the tensors left out of a comparison (None when none were)."""
    if not skipped:
        return None
    examples = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3])
    more = "; ..." if len(skipped) > 3 else ""
    return (f"{len(skipped)} tensors skipped, not in both checkpoints with one shape "
            f"({examples}{more}); the figures cover the {compared} compared")


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    return tqdm(items, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


# --------------------------------------------------------------------------- "unchanged" tests


# The 16-bit formats a weight is compared in, by the names the command line takes.
IMAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def image_bits(t: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The ``dtype`` (bf16 or float16) bit pattern (int16) a ``dtype`` checkpoint of ``t``
    holds: a ``dtype`` tensor's own bits, else torch's nearest-even cast (from fp32), the
    image the optimizer's change bitmaps compare for fp32 params with that
    ``change_dtype`` (NaN aside: the cast to bf16 writes NaN as 0xFFFF, the optimizer as
    0x7FC0)."""
    if dtype not in _SHORT:
        raise ValueError(f"image dtype must be torch.bfloat16 or torch.float16, got {dtype!r}")
    if t.dtype != dtype:
        t = t.float().to(dtype)
    return t.contiguous().view(torch.int16)


def bf16_bits(t: Tensor) -> Tensor:
    """The bf16 bit pattern (int16) a bf16 checkpoint of ``t`` holds (:func:`image_bits`)."""
    return image_bits(t, torch.bfloat16)


def compared_dtype(dtype0: torch.dtype, dtype1: torch.dtype,
                   image_dtype: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The 16-bit format two tensors are compared in: their own when both are bf16 or both
    float16 (a stored weight changed iff its bits did), else ``image_dtype`` (fp32 and
    float64 tensors, and pairs of two different dtypes, are compared on their nearest-even
    images in it)."""
    if dtype0 == dtype1 and dtype0 in _SHORT:
        return dtype0
    return image_dtype


def unchanged_bitwise(w0: Tensor, w1: Tensor,
                      image_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Bool tensor: the 16-bit bits of ``w0`` and ``w1`` are identical (the paper's test):
    in the format :func:`compared_dtype` picks (bf16 for bf16 pairs and by default)."""
    dtype = compared_dtype(w0.dtype, w1.dtype, image_dtype)
    return image_bits(w0, dtype) == image_bits(w1, dtype)


def unchanged_relative(w0: Tensor, w1: Tensor, eta: float = 1e-3) -> Tensor:
    """Bool tensor: ``|w1 - w0| <= eta * |w0|``, the paper's Def. 2.1 (computed in float64).

    On bf16 values with ``eta = 1e-3`` (any ``0 <= eta < 2**-8``) this is bit equality,
    except for two zeros of opposite sign. Proof, for finite bf16 ``w0``, ``w1`` whose bits differ:

    * ``w0 = ±0``: the bound is 0, so only ``w1`` = the other zero passes (values equal,
      bits differ: the one disagreement among finite values);
    * ``w1 = ±0`` and ``w0 != 0``: ``|w1 - w0| = |w0| > eta |w0|``;
    * opposite signs, both nonzero: ``|w1 - w0| = |w0| + |w1| > eta |w0|``;
    * same sign, say ``2**e <= |w0| < 2**(e+1)`` (normal): bf16 keeps 8 significant bits, so
      neighbours in that binade are ``2**(e-7)`` apart and ``|w1 - w0| >= 2**(e-7)`` >
      ``2**-8 |w0|``, except at ``|w0| = 2**e``, whose lower neighbour lies in the finer
      binade below, at distance ``2**(e-8) = 2**-8 |w0|`` (``2**(e-7)`` when that binade is
      subnormal). A subnormal ``|w0| = k * 2**-133`` (``1 <= k <= 127``) has neighbours
      ``2**-133 >= |w0| / 127`` away.

    So two distinct values always differ by at least ``2**-8 |w0|`` (~0.0039, nearly four
    times 1e-3; float64 rounding cannot bridge that margin), and the test passes exactly
    when the values are equal. With ``max(|w0|, |w1|)`` as the scale the smallest relative
    gap is also ``2**-8``, so that reading is the same test. Non-finite weights break it:
    NaN fails even with equal bits, and a finite ``w1`` passes against ``w0 = ±inf``.
    """
    a = w0.double()
    b = w1.double()
    return (b - a).abs() <= eta * a.abs()


def unchanged_absolute(w0: Tensor, w1: Tensor, atol: float = ABSOLUTE_TOLERANCE) -> Tensor:
    """Bool tensor: ``|w1 - w0| <= atol`` (earlier work's test; fp32 arithmetic)."""
    return (w1.float() - w0.float()).abs() <= atol


# --------------------------------------------------------------------------- names


def layer_index(name: str) -> int | None:
    """The block index of a parameter name: its first all-digit dotted part, or None.

    ``model.layers.3.mlp.up_proj.weight`` -> 3; ``lm_head.weight`` -> None.
    """
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def module_key(name: str) -> str:
    """The module type of a parameter name: what follows its block index, indices dropped.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj.weight`` (BERT's three
    ``dense`` layers stay apart: ``attention.output.dense.weight``, ``intermediate.dense.weight``,
    ``output.dense.weight``); a name without a block index is its own type (``lm_head.weight``).
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(p for p in parts[i + 1:] if not p.isdigit())
    return name


def summarize(rows: Iterable[Mapping], key: Callable[[Mapping], Any],
              counts: Sequence[str]) -> list[dict]:
    """Sum the ``counts`` columns (and ``numel``) of rows grouped by ``key(row)``.

    Groups keep the order of their first row.
    """
    totals: dict[Any, dict] = {}
    for row in rows:
        k = key(row)
        if k not in totals:
            totals[k] = {"group": k, "numel": 0, **{c: 0 for c in counts}}
        totals[k]["numel"] += row["numel"]
        for c in counts:
            totals[k][c] += row[c]
    return list(totals.values())


# --------------------------------------------------------------------------- update sparsity


def update_sparsity(base: Any, tuned: Any, *, atol: float = ABSOLUTE_TOLERANCE,
                    image_dtype: torch.dtype = torch.bfloat16,
                    progress: bool = False) -> dict[str, Any]:
    """Update sparsity of ``tuned`` against ``base``, streaming tensor by tensor.

    Args:
        base, tuned: anything :func:`open_checkpoint` reads.
        atol: tolerance of the absolute-tolerance variant (default 1e-5).
        image_dtype: ``torch.bfloat16`` (default) or ``torch.float16``: the image fp32
            tensors are compared on (bf16 and float16 pairs compare their own bits;
            :func:`compared_dtype`).
        progress: show a tqdm bar over tensors on stderr (default False).

    Returns a dict: ``tensors`` (rows ``name, module, layer, numel, unchanged,
    unchanged_atol, bits, dtypes``: ``bits`` the format compared, ``"bf16"`` or
    ``"fp16"``, ``dtypes`` the two tensors' dtypes), ``modules`` and ``layers`` (the same
    counts grouped by module type and block index, ``layer`` None for tensors outside the
    blocks), ``overall`` (one row), each row with ``sparsity = unchanged / numel`` and
    ``sparsity_atol``; ``compared`` (what each tensor was compared on: rows ``bits, how,
    tensors, numel``, ``how`` "own bits" or "images of <dtype>"), ``image_dtype``
    (``"bf16"`` or ``"fp16"``), ``bits`` (``"bf16"``, ``"fp16"`` or ``"bf16/fp16"`` when
    both were used); ``skipped`` (tensors missing on one side or of different shapes),
    ``warning`` (a line that counts and names the skipped tensors, None when there are
    none) and ``atol``.

    Raises :class:`~rlvr_optim.errors.InputError` when no tensor can be compared (no name
    in common, or every shared tensor of another shape).
    """
    if image_dtype not in _SHORT:
        raise ValueError(f"image_dtype must be torch.bfloat16 or torch.float16, got "
                         f"{image_dtype!r}")
    base, tuned = open_checkpoint(base), open_checkpoint(tuned)
    names, skipped = _comparable_tensors(base, tuned)
    rows = []
    for name in _progress(names, progress, "sparsity"):
        w0, w1 = base.get(name).reshape(-1), tuned.get(name).reshape(-1)
        unchanged = unchanged_atol = 0
        # Chunks bound the scratch memory (fp32 copies, masks) for embeddings of 10^9 elements.
        for i in range(0, w0.numel(), _CHUNK):
            a, b = w0[i:i + _CHUNK], w1[i:i + _CHUNK]
            unchanged += int(unchanged_bitwise(a, b, image_dtype).sum())
            unchanged_atol += int(unchanged_absolute(a, b, atol).sum())
        rows.append({"name": name, "module": module_key(name), "layer": layer_index(name),
                     "numel": w0.numel(), "unchanged": unchanged, "unchanged_atol": unchanged_atol,
                     "bits": _SHORT[compared_dtype(w0.dtype, w1.dtype, image_dtype)],
                     "dtypes": [_dtype_name(w0.dtype), _dtype_name(w1.dtype)]})
        del w0, w1
    counts = ("unchanged", "unchanged_atol")
    modules = _rename(summarize(rows, lambda r: r["module"], counts), "module")
    layers = _rename(summarize(rows, lambda r: r["layer"], counts), "layer")
    layers.sort(key=lambda r: (r["layer"] is None, r["layer"] if r["layer"] is not None else 0))
    overall = _rename(summarize(rows, lambda r: "all", counts), "tensors")
    for r in overall:
        r["tensors"] = len(rows)
    for group in (rows, modules, layers, overall):
        for r in group:
            r["sparsity"] = r["unchanged"] / r["numel"] if r["numel"] else 1.0
            r["sparsity_atol"] = r["unchanged_atol"] / r["numel"] if r["numel"] else 1.0
    compared = _compared(rows)
    bits = {c["bits"] for c in compared}
    return {"tensors": rows, "modules": modules, "layers": layers, "overall": overall[0],
            "compared": compared, "image_dtype": _SHORT[image_dtype],
            "bits": bits.pop() if len(bits) == 1 else "bf16/fp16",
            "skipped": skipped, "warning": _skipped_warning(skipped, len(rows)), "atol": atol}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compared(rows: Sequence[Mapping]) -> list[dict]:
    """What the tensors were compared on: one row per (bits, how) with its counts."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        own = r["dtypes"][0] == r["dtypes"][1] and \
            _SHORT.get(getattr(torch, r["dtypes"][0])) == r["bits"]
        how = "own bits" if own else "images of " + " / ".join(dict.fromkeys(r["dtypes"]))
        entry = out.setdefault((r["bits"], how), {"bits": r["bits"], "how": how,
                                                  "tensors": 0, "numel": 0})
        entry["tensors"] += 1
        entry["numel"] += r["numel"]
    return list(out.values())


def compared_line(result: Mapping[str, Any]) -> str:
    """One line saying what :func:`update_sparsity` compared: the bits, own or images, and
    the image dtype fp32 tensors took."""
    parts = [f"{c['bits']} {c['how']} ({c['tensors']} tensors, {c['numel']:,} elements)"
             for c in result["compared"]]
    return (f"compared on: {'; '.join(parts)}; fp32 tensors are compared on their "
            f"{result['image_dtype']} images (--image-dtype)")


def _rename(rows: list[dict], key: str) -> list[dict]:
    for r in rows:
        r[key] = r.pop("group")
    return rows


# --------------------------------------------------------------------------- masks


def top_fraction(scores: Tensor, alpha: float, largest: bool = True,
                 tie_seed: int | None = None) -> Tensor:
    """Bool mask (shape of ``scores``) of the ``round(alpha * numel)`` largest (or smallest).

    Elements equal to the cut value are taken by flat index, lower first, or, with
    ``tie_seed``, in a random order drawn from that seed; either way the mask is
    deterministic. Linear time (a k-th value selection, no sort).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    flat = scores.reshape(-1)
    n = flat.numel()
    k = int(round(alpha * n))
    if k in (0, n):
        return torch.full(scores.shape, k == n, dtype=torch.bool, device=scores.device)
    if largest:
        cut = torch.kthvalue(flat, n - k + 1).values
        mask = flat > cut
    else:
        cut = torch.kthvalue(flat, k).values
        mask = flat < cut
    ties = torch.nonzero(flat == cut).reshape(-1)
    if tie_seed is not None:
        gen = torch.Generator().manual_seed(tie_seed)
        ties = ties[torch.randperm(ties.numel(), generator=gen).to(ties.device)]
    mask[ties[: k - int(mask.sum())]] = True
    return mask.reshape(scores.shape)


def resolve_rank(rank: int | float, shape: Sequence[int]) -> int:
    """An int rank as is; a float in (0, 1] as that fraction of ``min(shape)`` (at least 1)."""
    full = min(shape)
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank must be in (0, 1], got {rank}")
        return max(1, int(round(rank * full)))
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return min(int(rank), full)


def parse_rank(text: str) -> int | float:
    """A rank written on the command line: ``"8"`` -> 8, ``"0.05"`` -> a fraction 0.05."""
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if value <= 0:
        raise ValueError(f"a rank must be positive, got {text}")
    return value


def _svd(w: Tensor, device: str | torch.device | None) -> tuple[Tensor, Tensor, Tensor]:
    # float64: the top-alpha cut of the reconstruction must not hinge on fp32 rounding.
    return torch.linalg.svd(w.to(device=device, dtype=torch.float64), full_matrices=False)


def _check_matrix(w: Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(w.shape)}")


def principal_mask(w0: Tensor, alpha: float = 0.2, rank: int | float = 0.05, *,
                   device: str | torch.device | None = None) -> Tensor:
    """The principal weights of a matrix: top-``alpha`` of ``|U_k S_k V_k^T|`` (bool, CPU).

    Args:
        w0: 2-D weight matrix.
        alpha: share of elements in the mask (default 0.2).
        rank: k, an int or a fraction of ``min(shape)`` (default 0.05, at least 1).
        device: where to run the float64 SVD (default: the tensor's device).
    """
    _check_matrix(w0)
    u, s, vh = _svd(w0, device)
    k = resolve_rank(rank, w0.shape)
    reconstruction = (u[:, :k] * s[:k]) @ vh[:k]
    return top_fraction(reconstruction.abs(), alpha).cpu()


def low_magnitude_mask(w0: Tensor, alpha: float = 0.2) -> Tensor:
    """Bottom-``alpha`` of ``|w0|`` (bool, same shape)."""
    return top_fraction(w0.float().abs(), alpha, largest=False)


def top_update_mask(w0: Tensor, w1: Tensor, alpha: float = 0.2) -> Tensor:
    """Top-``alpha`` of ``|w1 - w0|``: an update mask of density ``alpha`` whatever the precision.

    When fewer than ``alpha`` of the elements moved, the mask is filled with unmoved ones
    taken in a fixed random order (not by index, which would favour the first rows).
    """
    return top_fraction((w1.double() - w0.double()).abs(), alpha, tie_seed=0)


def overlap(update: Tensor, mask: Tensor) -> dict[str, float]:
    """``|update & mask| / |mask|`` against its random baseline.

    If the update mask fell on random positions, the expected overlap would be its density
    ``|update| / numel`` (``alpha`` for a top-``alpha`` update mask), whatever the mask.
    ``lift = overlap / baseline`` is the same for the other normalisation,
    ``|update & mask| / |update|`` against the mask's density.
    """
    update, mask = update.reshape(-1).bool(), mask.reshape(-1).bool()
    inter = int((update & mask).sum())
    size = int(mask.sum())
    density = int(update.sum()) / update.numel() if update.numel() else 0.0
    value = inter / size if size else 0.0
    return {"overlap": value, "baseline": density,
            "lift": value / density if density else float("nan")}


def magnitude_bins(w0: Tensor, bins: int = 16) -> Tensor:
    """Bin index (int64, shape of ``w0``) of each element by the rank of ``|w0|`` in its tensor.

    ``bins`` equal-count bins, bin 0 the smallest magnitudes; equal magnitudes are ranked by
    flat index, so the bins are deterministic. A bf16 weight's bits change only when its
    update passes half a ULP, which grows with ``|w0|``: comparing an update mask with
    masks inside each bin removes that confound (:func:`matched_overlap`).
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    flat = w0.detach().reshape(-1).float().abs().cpu()
    n = flat.numel()
    order = torch.sort(flat, stable=True).indices
    ranks = torch.empty(n, dtype=torch.int64)
    ranks[order] = torch.arange(n)
    return (ranks * bins // max(n, 1)).reshape(w0.shape)


def _matched_expectation(update: Tensor, mask: Tensor, bins: Tensor, nbins: int) -> float:
    """Expected ``|perm(update) & mask|`` over permutations of ``update`` within each bin:
    the sum over bins of ``|update_b| * |mask_b| / n_b``."""
    b = bins.reshape(-1)
    n = torch.bincount(b, minlength=nbins).double()
    u = torch.bincount(b, weights=update.reshape(-1).double(), minlength=nbins)
    m = torch.bincount(b, weights=mask.reshape(-1).double(), minlength=nbins)
    return float((u * m / n.clamp(min=1)).sum())


def matched_overlap(update: Tensor, mask: Tensor, w0: Tensor, bins: int = 16) -> dict[str, float]:
    """:func:`overlap` beside a magnitude-matched null.

    The null permutes the update mask at random within each :func:`magnitude_bins` bin of
    ``w0``: it keeps how many weights of each magnitude changed and forgets which. Its
    expected overlap is computed exactly (no sampling). ``matched_lift = overlap /
    matched_baseline`` is about 1 when magnitude alone explains where the update fell,
    whatever the plain ``lift`` says.
    """
    update, mask = update.reshape(-1).bool().cpu(), mask.reshape(-1).bool().cpu()
    plain = overlap(update, mask)
    size = int(mask.sum())
    expected = _matched_expectation(update, mask, magnitude_bins(w0, bins), bins)
    matched = expected / size if size else 0.0
    return {**plain, "matched_baseline": matched,
            "matched_lift": plain["overlap"] / matched if matched else float("nan")}


def jaccard(a: Tensor, b: Tensor) -> dict[str, float]:
    """Jaccard similarity ``|a & b| / |a | b|`` and the independent-Bernoulli baseline.

    Masks of densities p and q placed independently at random have expected intersection
    ``pq`` and union ``p + q - pq`` per element, hence the baseline ``pq / (p + q - pq)``.
    """
    a, b = a.reshape(-1).bool(), b.reshape(-1).bool()
    n = a.numel()
    inter, union = int((a & b).sum()), int((a | b).sum())
    return jaccard_from_counts(inter, union, int(a.sum()), int(b.sum()), n)


def jaccard_from_counts(inter: int, union: int, na: int, nb: int, n: int) -> dict[str, float]:
    """:func:`jaccard` from counts: intersection, union, set sizes and element count."""
    p, q = (na / n, nb / n) if n else (0.0, 0.0)
    denominator = p + q - p * q
    return {"jaccard": inter / union if union else float("nan"),
            "baseline": p * q / denominator if denominator else float("nan"),
            "density_a": p, "density_b": q}


def spectrum_drift(w0: Tensor, w1: Tensor) -> float:
    """``||sigma(W1) - sigma(W0)||_2 / ||sigma(W0)||_2`` of two matrices (float64)."""
    _check_matrix(w0)
    s0 = torch.linalg.svdvals(w0.double())
    s1 = torch.linalg.svdvals(w1.double())
    return float(torch.linalg.vector_norm(s1 - s0) / torch.linalg.vector_norm(s0))


def principal_angles(w0: Tensor, w1: Tensor, k: int | float = 0.05) -> dict[str, list[float]]:
    """Principal angles (degrees, ascending) between the top-k singular subspaces of two matrices.

    ``left`` compares the column spaces ``U_k``, ``right`` the row spaces ``V_k``; the
    cosines are the singular values of ``U0_k^T U1_k``.
    """
    _check_matrix(w0)
    k = resolve_rank(k, w0.shape)
    u0, _, vh0 = _svd(w0, None)
    u1, _, vh1 = _svd(w1, None)
    return {"left": _angles(u0[:, :k], u1[:, :k]), "right": _angles(vh0[:k].T, vh1[:k].T)}


def _angles(a: Tensor, b: Tensor) -> list[float]:
    cosines = torch.linalg.svdvals(a.T @ b).clamp(-1.0, 1.0)
    return sorted(torch.rad2deg(torch.arccos(cosines)).tolist())


# --------------------------------------------------------------------------- geometry


def geometry(base: Any, tuned: Any, *, alpha: float = 0.2, rank: int | float = 0.05,
             device: str | torch.device | None = None, progress: bool = False,
             base_cache: dict | None = None, bins: int = 16,
             image_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Per-matrix overlap with principal / low-magnitude masks, spectrum drift, principal angles.

    Args:
        base, tuned: anything :func:`open_checkpoint` reads; only 2-D tensors are used.
        alpha: share of each matrix in the principal and low-magnitude masks and in the
            top-``alpha`` update mask (default 0.2).
        rank: k of the rank-k reconstruction and of the subspaces (int or fraction of
            ``min(shape)``, default 0.05).
        device: where to run the SVDs (default CPU; two float64 SVDs per matrix).
        progress: tqdm bar on stderr (default False).
        base_cache: a dict kept between calls with the same base (e.g. several runs from
            one start): the base's SVD and masks are computed once into it.
        bins: magnitude bins of the matched null (:func:`matched_overlap`, default 16).
        image_dtype: the image fp32 tensors' ``changed`` mask compares (:func:`unchanged_bitwise`).

    Masks: ``principal``, ``low_magnitude`` and ``principal_not_low`` (principal minus
    low-magnitude, the paper's split). Updates: ``changed`` (16-bit bits differ, as
    :func:`update_sparsity` compares them) and ``top``
    (top-``alpha`` of ``|delta|``; on fp32 tensors, e.g. master weights, this is the
    overlap of the fp32 deltas).

    Returns ``matrices`` (one row per matrix: counts ``changed``, ``top``, ``<mask>``,
    ``<update>_in_<mask>`` and ``<update>_in_<mask>_null`` (the matched null's expected
    count); ``update_norm`` = ``||W1 - W0||_F / ||W0||_F``; ``spectrum_drift``,
    ``angle_left``, ``angle_right`` (the largest principal angle in degrees)) and
    ``overall``: per update and mask the overlap summed over matrices, ``_lift`` against
    the update's density and ``_matched_lift`` against the matched null; ``<update>_baseline``;
    the mean ``update_norm``, drift and angles, and the same three per unit of update size
    (``drift_per_update``, ``angle_left_per_update``, ``angle_right_per_update``: the mean
    over matrices of each measure divided by the matrix's ``update_norm``; drift per update
    is at most 1, by Mirsky's inequality).
    Raises :class:`~rlvr_optim.errors.InputError` as :func:`update_sparsity` does.
    """
    base, tuned = open_checkpoint(base), open_checkpoint(tuned)
    names, _ = _comparable_tensors(base, tuned)
    names = [n for n in names if len(base.shape(n)) == 2 and min(base.shape(n)) >= 2]
    rows = []
    for name in _progress(names, progress, "geometry"):
        w0, w1 = base.get(name), tuned.get(name)
        key = (name, alpha, rank, bins)
        facts = base_cache.get(key) if base_cache is not None else None
        if facts is None:
            facts = _base_facts(w0, alpha, rank, device, bins)
            if base_cache is not None:
                base_cache[key] = facts
        k = facts["k"]
        u1, s1, vh1 = _svd(w1, device)
        updates = {"changed": ~unchanged_bitwise(w0, w1, image_dtype),
                   "top": top_update_mask(w0, w1, alpha)}
        s0 = facts["s"].to(s1.device)
        row: dict[str, Any] = {
            "name": name, "module": module_key(name), "layer": layer_index(name),
            "numel": w0.numel(), "rank": k,
            "update_norm": float(torch.linalg.vector_norm(w1.double() - w0.double())
                                 / torch.linalg.vector_norm(w0.double())),
            "spectrum_drift": float(torch.linalg.vector_norm(s1 - s0)
                                    / torch.linalg.vector_norm(s0)),
            "angle_left": _angles(facts["u"].to(u1.device), u1[:, :k])[-1],
            "angle_right": _angles(facts["v"].to(vh1.device), vh1[:k].T)[-1],
        }
        for mask_name in _GEOMETRY_MASKS:
            row[mask_name] = int(facts[mask_name].sum())
        for update_name, update in updates.items():
            row[update_name] = int(update.sum())
            for mask_name in _GEOMETRY_MASKS:
                mask = facts[mask_name]
                row[f"{update_name}_in_{mask_name}"] = int((update & mask).sum())
                row[f"{update_name}_in_{mask_name}_null"] = _matched_expectation(
                    update, mask, facts["bins"], bins)
        rows.append(row)
    return {"matrices": rows, "overall": _geometry_overall(rows), "alpha": alpha, "rank": rank,
            "bins": bins}


_GEOMETRY_MASKS = ("principal", "low_magnitude", "principal_not_low")


def _base_facts(w0: Tensor, alpha: float, rank: int | float,
                device: str | torch.device | None, bins: int) -> dict[str, Any]:
    """What :func:`geometry` needs of a base matrix: masks, magnitude bins, spectrum, top-k
    singular vectors."""
    k = resolve_rank(rank, w0.shape)
    u0, s0, vh0 = _svd(w0, device)
    principal = top_fraction(((u0[:, :k] * s0[:k]) @ vh0[:k]).abs(), alpha).cpu()
    low = low_magnitude_mask(w0, alpha).cpu()
    return {"k": k, "s": s0, "u": u0[:, :k].clone(), "v": vh0[:k].T.clone(),
            "principal": principal, "low_magnitude": low, "principal_not_low": principal & ~low,
            "bins": magnitude_bins(w0, bins)}


def _geometry_overall(rows: list[dict]) -> dict[str, float]:
    def total(key: str) -> float:
        return sum(r[key] for r in rows)

    numel = total("numel")
    out: dict[str, float] = {"matrices": len(rows), "numel": numel}
    if not rows:
        return out
    nan = float("nan")
    for update in ("changed", "top"):
        density = total(update) / numel
        for mask in _GEOMETRY_MASKS:
            size = total(mask)
            value = total(f"{update}_in_{mask}") / size if size else 0.0
            null = total(f"{update}_in_{mask}_null") / size if size else 0.0
            out[f"{update}_in_{mask}"] = value
            out[f"{update}_in_{mask}_lift"] = value / density if density else nan
            out[f"{update}_in_{mask}_matched_lift"] = value / null if null else nan
        out[f"{update}_baseline"] = density
    for key in ("update_norm", "spectrum_drift", "angle_left", "angle_right"):
        out[key] = sum(r[key] for r in rows) / len(rows)
    moved = [r for r in rows if r["update_norm"] > 0]
    for key, name in (("spectrum_drift", "drift_per_update"),
                      ("angle_left", "angle_left_per_update"),
                      ("angle_right", "angle_right_per_update")):
        out[name] = sum(r[key] / r["update_norm"] for r in moved) / len(moved) if moved else nan
    return out


def update_jaccard(base: Any, tuned_a: Any, tuned_b: Any, *, progress: bool = False,
                   image_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Jaccard of the bitwise update masks of two runs from the same base, with baselines
    (``image_dtype``: as in :func:`update_sparsity`).

    Returns ``modules`` (per module type) and ``overall`` rows with ``jaccard``,
    ``baseline`` (independent Bernoulli), ``density_a``, ``density_b``. Raises
    :class:`~rlvr_optim.errors.InputError` when no tensor is in all three with one shape.
    """
    base, tuned_a, tuned_b = map(open_checkpoint, (base, tuned_a, tuned_b))
    names, _ = _comparable_tensors(base, tuned_a)
    in_b = set(_comparable_tensors(base, tuned_b)[0])
    names = [n for n in names if n in in_b]
    if not names:
        raise InputError(f"no tensor of {base.description} is in both {tuned_a.description} "
                         f"and {tuned_b.description} with its shape: nothing to compare")
    rows = []
    for name in _progress(names, progress, "jaccard"):
        w0 = base.get(name)
        a = ~unchanged_bitwise(w0, tuned_a.get(name), image_dtype)
        b = ~unchanged_bitwise(w0, tuned_b.get(name), image_dtype)
        rows.append({"name": name, "module": module_key(name), "numel": w0.numel(),
                     "inter": int((a & b).sum()), "union": int((a | b).sum()),
                     "a": int(a.sum()), "b": int(b.sum())})
    counts = ("inter", "union", "a", "b")

    def finish(group: dict, key: str) -> dict:
        return {key: group["group"], "numel": group["numel"],
                **jaccard_from_counts(group["inter"], group["union"], group["a"],
                                       group["b"], group["numel"])}

    modules = [finish(g, "module") for g in summarize(rows, lambda r: r["module"], counts)]
    overall = summarize(rows, lambda r: "all", counts)
    return {"modules": modules, "overall": finish(overall[0], "tensors")}


# --------------------------------------------------------------------------- freeze masks


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool tensor in the :mod:`rlvr_optim.bitmaps` format, on the CPU.

    Same bytes as :func:`rlvr_optim.bitmaps.pack`, through ``numpy.packbits`` with one byte
    of scratch per element (``pack`` takes eight), for the largest matrices of a 7B model.
    """
    flat = mask.reshape(-1).cpu().numpy().astype(bool)
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def _random_same_count(mask: Tensor, seed: int, name: str) -> Tensor:
    """A random bool mask with as many set elements as ``mask``, seeded by seed and name."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    n = mask.numel()
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=gen)[: int(mask.sum())]] = True
    return out.reshape(mask.shape)


def build_masks(base: Any, kinds: Sequence[str] = MASK_KINDS, *, alpha: float = 0.2,
                rank: int | float = 0.05, random_like: str = "principal", seed: int = 0,
                device: str | torch.device | None = None,
                progress: bool = False) -> dict[str, dict[str, dict]]:
    """Masks of every 2-D weight matrix of ``base``, packed (bit 1 = in the set).

    Args:
        base: anything :func:`open_checkpoint` reads.
        kinds: any of :data:`MASK_KINDS`: ``principal`` (:func:`principal_mask`),
            ``non_principal`` (its complement), ``low_magnitude``
            (:func:`low_magnitude_mask`), ``principal_or_low_magnitude`` (their union),
            ``random`` (per matrix, as many elements as ``random_like``'s mask, at random).
        alpha, rank, device: as in :func:`principal_mask`.
        random_like: the kind whose per-matrix counts the random mask copies (default
            ``"principal"``).
        seed: seed of the random mask (default 0).
        progress: tqdm bar on stderr (default False).

    Returns ``{kind: {"bitmaps": {name: packed uint8 bitmap}, "numels": {name: numel}}}``.
    Tensors that are not matrices (biases, norms) get no mask: used as freeze masks, they
    stay fully trained.
    """
    unknown = [k for k in kinds if k not in MASK_KINDS]
    if unknown or random_like not in MASK_KINDS or random_like == "random":
        raise ValueError(f"mask kinds must be among {MASK_KINDS} (random_like not 'random'), "
                         f"got {list(kinds)} and random_like={random_like!r}")
    ckpt = open_checkpoint(base)
    names = [n for n in ckpt.names() if len(ckpt.shape(n)) == 2 and min(ckpt.shape(n)) >= 2]
    packed: dict[str, dict[str, Tensor]] = {k: {} for k in kinds}
    for name in _progress(names, progress, "masks"):
        w0 = ckpt.get(name)
        masks: dict[str, Tensor] = {}
        need = set(kinds) | ({random_like} if "random" in kinds else set())
        if need & {"principal", "non_principal", "principal_or_low_magnitude"}:
            masks["principal"] = principal_mask(w0, alpha, rank, device=device)
            masks["non_principal"] = ~masks["principal"]
        if need & {"low_magnitude", "principal_or_low_magnitude"}:
            masks["low_magnitude"] = low_magnitude_mask(w0, alpha)
        if "principal_or_low_magnitude" in need:
            masks["principal_or_low_magnitude"] = masks["principal"] | masks["low_magnitude"]
        if "random" in kinds:
            masks["random"] = _random_same_count(masks[random_like], seed, name)
        for kind in kinds:
            packed[kind][name] = pack_mask(masks[kind])
    numels = {name: int(math.prod(ckpt.shape(name))) for name in names}
    return {kind: {"bitmaps": packed[kind], "numels": numels} for kind in kinds}


def save_masks(directory: str | os.PathLike, masks: Mapping[str, Mapping],
               metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write each kind of :func:`build_masks`' result to ``<directory>/<kind>.safetensors``.

    Returns the paths written. The files are :func:`rlvr_optim.bitmaps.save_bitmaps` files,
    added to the folder together or not at all (:func:`rlvr_optim.files.atomic_files`).
    """
    names = [f"{kind}.safetensors" for kind in masks]
    with files.atomic_files(directory) as temp:
        for (kind, entry), name in zip(masks.items(), names):
            meta = {"mask_kind": kind, **(metadata or {})}
            bitmaps.save_bitmaps(temp / name, entry["bitmaps"], entry["numels"], metadata=meta)
    return [os.path.join(os.fspath(directory), name) for name in names]


def load_masks(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Read a mask file written by :func:`save_masks`: (packed bitmaps, element counts)."""
    packed, numels, _ = bitmaps.load_bitmaps(path)
    return packed, numels


def apply_freeze_masks(optimizer, named_params: Iterable[tuple[str, Tensor]],
                       masks: str | os.PathLike | Mapping[str, Tensor]) -> list[str]:
    """Train only the masked elements: set each mask as ``optimizer``'s freeze mask.

    Args:
        optimizer: an :class:`rlvr_optim.AdamW` holding the params.
        named_params: ``model.named_parameters()`` (names as in the mask file).
        masks: a mask file (:func:`save_masks`) or ``{name: packed bitmap}``. A bit 1 means
            "trained", so the ``non_principal`` file freezes the principal weights.

    Returns the names that got a mask; raises naming a mask whose param is missing or
    whose size differs.
    """
    if not isinstance(masks, Mapping):
        masks, _ = load_masks(masks)
    params = dict(named_params)
    missing = [n for n in masks if n not in params]
    if missing:
        raise KeyError(f"masks for params the model does not have: {missing[:5]}"
                       f"{' ...' if len(missing) > 5 else ''}")
    for name, packed in masks.items():
        optimizer.set_freeze_mask(params[name], packed)
    return list(masks)


# --------------------------------------------------------------------------- tables and files


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str],
                   headers: Sequence[str] | None = None,
                   formats: Mapping[str, str] | None = None) -> str:
    """A GitHub markdown table; ``formats`` maps a column to a format spec (e.g. ``".2%"``)."""
    formats = formats or {}
    headers = list(headers) if headers is not None else list(columns)

    def cell(column: str, value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
        spec = formats.get(column)
        if spec is not None and isinstance(value, (int, float)):
            return format(value, spec)
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


_SPARSITY_FORMATS = {"sparsity": ".2%", "sparsity_atol": ".2%"}


def format_sparsity(result: Mapping[str, Any], max_layers: int = 64) -> str:
    """Terminal tables of :func:`update_sparsity`'s result: overall, module types, layers.

    The warning about skipped tensors, if any, comes first, so it is read before the figures.
    """
    from .optimizer import format_table

    bits = result.get("bits", "bf16")

    def pct(rows: Iterable[Mapping], key: str) -> list[dict]:
        return [{key: r[key] if r[key] is not None else "other", "numel": r["numel"],
                 f"unchanged ({bits} bits)": f"{r['sparsity']:.2%}",
                 f"|delta| <= {result['atol']:g}": f"{r['sparsity_atol']:.2%}"} for r in rows]

    parts = [f"warning: {result['warning']}", ""] if result["warning"] else []
    if "compared" in result:
        parts += [compared_line(result), ""]
    parts += ["update sparsity (share of weights unchanged)",
              format_table(pct([result["overall"]], "tensors")), "",
              "by module type", format_table(pct(result["modules"], "module")), ""]
    layers = result["layers"]
    parts += ["by layer" + (f" (first {max_layers})" if len(layers) > max_layers else ""),
              format_table(pct(layers[:max_layers], "layer"))]
    return "\n".join(parts)


def write_sparsity_report(directory: str | os.PathLike, result: Mapping[str, Any],
                          geometry_result: Mapping[str, Any] | None = None,
                          jaccard_result: Mapping[str, Any] | None = None,
                          title: str = "Update sparsity") -> list[str]:
    """Write ``sparsity.md``, ``sparsity.json`` and PNG plots into ``directory``.

    A warning about skipped tensors heads the markdown; the JSON holds ``result`` whole
    (``sparsity.warning``, ``sparsity.skipped``). Plots need matplotlib (``pip install
    rlvr_optim[ablation]``); without it they are skipped and the markdown says so. The
    files (:data:`SPARSITY_REPORT_FILES`) are added to the folder together or not at all
    (:func:`rlvr_optim.files.atomic_files`). Returns the paths written.
    """
    directory = os.fspath(directory)
    with files.atomic_files(directory) as temp:
        names = _write_sparsity_files(str(temp), result, geometry_result, jaccard_result, title)
    return [os.path.join(directory, name) for name in names]


def _write_sparsity_files(directory: str, result: Mapping[str, Any],
                          geometry_result: Mapping[str, Any] | None,
                          jaccard_result: Mapping[str, Any] | None, title: str) -> list[str]:
    """Write :func:`write_sparsity_report`'s files into ``directory``; returns their names."""
    atol = result["atol"]
    cols = ["numel", "sparsity", "sparsity_atol"]
    bits = result.get("bits", "bf16")
    heads = ["elements", f"unchanged ({bits} bits)", f"unchanged (abs. tol. {atol:g})"]
    md = [f"# {title}", "",
          f"A weight is unchanged when its {bits} bits are identical (for bf16, the paper's "
          "Def. 2.1 with eta = 1e-3 is the same test); the absolute-tolerance column counts "
          f"|delta| <= {atol:g}."]
    if "compared" in result:
        md += ["", compared_line(result).replace("compared on:", "Compared on:", 1) + "."]
    if result["warning"]:
        md += ["", f"**Warning:** {result['warning']} (all of them are listed in "
                   "sparsity.json, `sparsity.skipped`)."]
    md += ["", "## Overall", "", markdown_table([result["overall"]], ["tensors"] + cols,
                                                ["tensors"] + heads, _SPARSITY_FORMATS),
           "", "## By module type", "",
           markdown_table(result["modules"], ["module"] + cols, ["module"] + heads,
                          _SPARSITY_FORMATS),
           "", "## By layer", "",
           markdown_table(result["layers"], ["layer"] + cols, ["layer"] + heads,
                          _SPARSITY_FORMATS)]
    payload: dict[str, Any] = {"sparsity": result}
    if geometry_result is not None:
        md += ["", "## Geometry", "", _geometry_markdown(geometry_result)]
        payload["geometry"] = geometry_result
    if jaccard_result is not None:
        md += ["", "## Jaccard of update masks (tuned vs other run)", "",
               markdown_table([jaccard_result["overall"]] + jaccard_result["modules"],
                              ["module", "numel", "jaccard", "baseline"],
                              ["module", "elements", "Jaccard", "independent baseline"])]
        payload["jaccard"] = jaccard_result
    paths = []
    plots = _sparsity_plots(directory, result, geometry_result)
    if plots is None:
        md += ["", "(plots skipped: matplotlib is not installed)"]
    else:
        md += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
        paths += plots
    files.write_text(os.path.join(directory, "sparsity.md"), "\n".join(md) + "\n")
    files.write_json(os.path.join(directory, "sparsity.json"), payload, indent=1)
    return ["sparsity.md", "sparsity.json"] + [os.path.basename(p) for p in paths]


_MASK_LABELS = {"principal": "principal", "low_magnitude": "low-magnitude",
                "principal_not_low": "principal minus low-magnitude"}


def geometry_rows(g: Mapping[str, Any]) -> list[dict]:
    """One row per (update mask, weight mask) of :func:`geometry`'s overall result: overlap,
    the random baseline, lift, and the magnitude-matched lift."""
    o, alpha = g["overall"], g["alpha"]
    updates = {"changed": "bf16 bits changed", "top": f"top {alpha:g} of abs(delta)"}
    return [{"update": label, "mask": _MASK_LABELS[mask], "overlap": o[f"{update}_in_{mask}"],
             "baseline": o[f"{update}_baseline"], "lift": o[f"{update}_in_{mask}_lift"],
             "matched_lift": o[f"{update}_in_{mask}_matched_lift"]}
            for update, label in updates.items() for mask in _GEOMETRY_MASKS]


_GEOMETRY_COLUMNS = ["update", "mask", "overlap", "baseline", "lift", "matched_lift"]
_GEOMETRY_HEADERS = ["update mask", "weight mask", "overlap", "random baseline", "lift",
                     "magnitude-matched lift"]
_GEOMETRY_FORMATS = {"overlap": ".2%", "baseline": ".2%", "lift": ".2f", "matched_lift": ".2f"}
_GEOMETRY_LEGEND = (
    "overlap = |update & mask| / |mask|, summed over matrices; random baseline = the update's "
    "density; lift = overlap / baseline; magnitude-matched lift = overlap / the expected "
    "overlap of the update mask permuted within {bins} bins of |W0| per matrix (1: magnitude "
    "alone explains where the update fell; the low-magnitude mask is a union of such bins, "
    "so its matched lift is about 1 by construction).")


def _geometry_summary(o: Mapping[str, Any]) -> str:
    return (f"Mean over {o['matrices']} matrices: relative update size ||dW||/||W0|| "
            f"{o['update_norm']:.3g}; spectrum drift {o['spectrum_drift']:.3g} "
            f"({o['drift_per_update']:.3g} per unit of update size); largest principal angle "
            f"of the top-k subspaces {o['angle_left']:.3g} deg left, {o['angle_right']:.3g} deg "
            f"right ({o['angle_left_per_update']:.3g} and {o['angle_right_per_update']:.3g} "
            "deg per unit of update size).")


def format_geometry(g: Mapping[str, Any]) -> str:
    """Terminal text of :func:`geometry`'s result: overlaps with both nulls, drift, angles."""
    from .optimizer import format_table

    o = g["overall"]
    if not g["matrices"]:
        return "geometry: no 2-D weight matrices"
    rows = [{h: (format(r[c], _GEOMETRY_FORMATS[c]) if c in _GEOMETRY_FORMATS else r[c])
             for c, h in zip(_GEOMETRY_COLUMNS, _GEOMETRY_HEADERS)} for r in geometry_rows(g)]
    return "\n".join([
        f"geometry over {o['matrices']} matrices (alpha {g['alpha']:g}, rank {g['rank']})",
        format_table(rows), _GEOMETRY_LEGEND.format(bins=g["bins"]),
        _geometry_summary(o)])


def _geometry_markdown(g: Mapping[str, Any]) -> str:
    if not g["matrices"]:
        return "(no 2-D weight matrices)"
    table = markdown_table(geometry_rows(g), _GEOMETRY_COLUMNS, _GEOMETRY_HEADERS,
                           _GEOMETRY_FORMATS)
    return (f"Masks of alpha = {g['alpha']:g} per matrix, principal from the rank-k "
            f"reconstruction (rank {g['rank']}).\n\n{table}\n\n"
            f"{_GEOMETRY_LEGEND.format(bins=g['bins'])}\n\n{_geometry_summary(g['overall'])}")


def load_pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


class FigureFolder:
    """Saves figures into one folder (tight layout, then closed) and keeps their paths, in
    the order saved: the reports' plotting functions share it. ``plt`` and ``colors``
    (matplotlib's colour cycle) are there for drawing."""

    def __init__(self, plt, out: str):
        self.plt, self._out = plt, out
        self.colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        self.paths: list[str] = []

    @classmethod
    def open(cls, out: str) -> "FigureFolder | None":
        """A folder to save into, or None when matplotlib is missing."""
        plt = load_pyplot()
        return None if plt is None else cls(plt, out)

    def save(self, fig, name: str) -> None:
        fig.tight_layout()
        path = os.path.join(self._out, name)
        try:
            files.write_figure(path, fig)
        finally:
            self.plt.close(fig)
        self.paths.append(path)


def _sparsity_plots(directory: str, result: Mapping[str, Any],
                    geometry_result: Mapping[str, Any] | None) -> list[str] | None:
    plt = load_pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    paths = []
    layers = [r for r in result["layers"] if r["layer"] is not None]
    if layers:
        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=90)
        xs = [r["layer"] for r in layers]
        ax.plot(xs, [100 * r["sparsity"] for r in layers], "o-",
                label=f"{result.get('bits', 'bf16')} bits identical")
        ax.plot(xs, [100 * r["sparsity_atol"] for r in layers], "s--",
                label=f"|delta| <= {result['atol']:g}")
        ax.set_xlabel("layer")
        # Layers are whole numbers; the default locator puts ticks at 0.5 for a few layers.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("unchanged weights (%)")
        ax.set_ylim(0, 100)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(directory, "sparsity_per_layer.png")
        try:
            files.write_figure(path, fig)
        finally:
            plt.close(fig)
        paths.append(path)
    if geometry_result is not None and geometry_result["matrices"]:
        o = geometry_result["overall"]
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
        labels = ["changed\n& principal", "changed\n& low-mag", "top-alpha\n& principal",
                  "top-alpha\n& low-mag"]
        values = [o["changed_in_principal"], o["changed_in_low_magnitude"],
                  o["top_in_principal"], o["top_in_low_magnitude"]]
        baselines = [o["changed_baseline"]] * 2 + [o["top_baseline"]] * 2
        xs = np.arange(len(labels))
        ax.bar(xs - 0.2, [100 * v for v in values], 0.4, label="overlap")
        ax.bar(xs + 0.2, [100 * b for b in baselines], 0.4, label="random baseline")
        ax.set_xticks(xs, labels)
        ax.set_ylabel("|update & mask| / |mask| (%)")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(directory, "overlap_vs_random.png")
        try:
            files.write_figure(path, fig)
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
