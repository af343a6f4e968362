"""Quantised linears kept on disk: a model's int4/int8 codes and scales, computed once per model, format and
machine and read back at later starts. Quantising the 1.5B target's weights took 20 s (int4) and 26 s (W8A8)
of a 2-core start (the rounding arithmetic over 1.5 billion weights); reading them back takes about a second,
and packing W8A8's codes for oneDNN or fbgemm (a layout, derived at every start) about two.

On a hit the layers are built from weights moved to the meta device (no arithmetic, no memory), then the
cached buffers are assigned in their place; a file that does not fit the model is deleted, and the model
loaded and quantised afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minedraft.cache_files import remove_quietly, source_digest, write_atomically
from minedraft.engine import fbgemm_w8a8, precision
from minedraft.engine.precision import (
    INT4_GROUP,
    QUANTS,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    W8A8Linear,
    int8_vnni,
    onednn_int8_available,
    pack_int8,
    quantizable,
    quantize_linears,
)
from minedraft.engine.trimmed_head import kept_digest

log = logging.getLogger(__name__)
CACHED_QUANTS = frozenset(QUANTS) - {"none"}
QUANTIZED_LAYERS = (Int4WeightOnlyLinear, Int8WeightOnlyLinear, W8A8Linear)  # composite formats hold these
FORMAT = 2  # raise when a quantised layer's buffers change


class StaleQuantCache(Exception):
    """A cached file did not fit the model, which was left half-built."""


def quantize_cached(model: torch.nn.Module, quant: str, model_path: str, cache: Path | None,
                    reload: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, int]:
    """`precision.quantize_linears` through a cache folder, for the formats that allow it: the model and how
    many linears were replaced. A cached file that does not fit is deleted, and the model reloaded and
    quantised afresh."""
    folder = Path(model_path)
    if quant not in CACHED_QUANTS or cache is None or not folder.is_dir():
        return model, quantize_linears(model, quant)
    kept = kept_digest(model)  # a draft's trimmed head (trimmed_head): which ids, in the key ("" when whole)
    key = _key(model, folder, quant, kept)
    cut = "|cut" if kept else ""
    family = hashlib.sha256(f"{folder.resolve()}|{quant}{cut}".encode()).hexdigest()[:16]  # a file per model, format
    path = cache / f"{family}-{key[:16]}.safetensors"
    if path.exists():
        try:
            return model, _read_back(model, quant, path, key)
        except Exception as error:
            log.warning("%s: %s; quantising again", path, error)
            remove_quietly(path)
            model = reload()
    replaced = quantize_linears(model, quant, pack=False)
    saved = _save(model, path, key)
    pack_int8(model)  # after saving: packing drops W8A8's codes
    if saved:
        log.info("quantised %d linears (%s) and kept them in %s", replaced, quant, path)
        for older in cache.glob(f"{family}-*.safetensors"):  # the same model and format, from older code or files
            if older != path:
                remove_quietly(older)
    return model, replaced


def _save(model: torch.nn.Module, path: Path, key: str) -> bool:
    buffers = {f"{name}.{buffer_name}": buffer.contiguous() for name, module in model.named_modules()
               if isinstance(module, QUANTIZED_LAYERS) for buffer_name, buffer in module.named_buffers()}
    return write_atomically(path, lambda temporary: save_file(buffers, str(temporary), metadata={"key": key}))


def _key(model: torch.nn.Module, folder: Path, quant: str, kept: str) -> str:
    """The weights' files (by name, size, time and a sample of their bytes), the model's config, the format, the
    kept ids of a trimmed head (`kept`, its digest), and the code and versions that compute and lay out the buffers."""
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns, _sampled_digest(f))
             for f in sorted(folder.glob("*.safetensors"))]
    config = folder / "config.json"
    settings = [str(folder.resolve()), files, config.read_text() if config.exists() else "", quant, INT4_GROUP,
                str(model.dtype), torch.__version__, torch.backends.cpu.get_cpu_capability(), int8_vnni(),
                onednn_int8_available(), source_digest(Path(precision.__file__)), FORMAT]
    if kept:
        settings.append(kept)
    if quant == "w8a8-fbgemm":  # its codes are laid out there too
        settings.append(source_digest(Path(fbgemm_w8a8.__file__)))
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def _sampled_digest(path: Path, samples: int = 256, size: int = 1 << 16) -> str:
    """A digest of `samples` evenly spaced slices of a file (16 MiB of a 7 GB one, read in well under a second):
    a fine-tune copied over the same file with its size and time kept changes every slice."""
    digest, length = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as weights:
        for i in range(samples):
            weights.seek(i * max(0, length - size) // max(1, samples - 1))
            digest.update(weights.read(size))
    return digest.hexdigest()


def _read_back(model: torch.nn.Module, quant: str, path: Path, key: str) -> int:
    with safe_open(str(path), framework="pt") as kept:
        if (kept.metadata() or {}).get("key") != key:  # a file copied or renamed into place
            raise StaleQuantCache("written for another model or format")
        names = kept.keys()  # safe_open is not iterable
        cached = {name: kept.get_tensor(name) for name in names}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and quantizable(module, quant):
            module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
    replaced = quantize_linears(model, quant, pack=False)
    _, unexpected = model.load_state_dict(cached, strict=False, assign=True)
    if unexpected or any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise StaleQuantCache("does not fit the model")
    del cached  # packing drops each W8A8 layer's codes: not held here meanwhile
    pack_int8(model)
    log.info("read %d quantised linears (%s) from %s", replaced, quant, path)
    return replaced
