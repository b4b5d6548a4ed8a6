"""Codebook files: round trips, interoperability with the safetensors library,
corrupt/foreign files, atomic writes and model checks."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from gsrq import _gsrq
from gsrq.codebooks import Codebooks, model_fingerprint
from gsrq.config import GSRQConfig, KindConfig
from gsrq.errors import CodebookFormatError, ConfigError, InvalidValueError, ModelMismatchError, ShapeError

safetensors_numpy = pytest.importorskip("safetensors.numpy")
from safetensors import safe_open  # noqa: E402

HF = {
    "model_type": "llama",
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "hidden_size": 96,
    "head_dim": 16,
    "vocab_size": 1000,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}
CONFIG = GSRQConfig(keys=KindConfig(D=8, Kc=16, M=2), values=KindConfig(D=16, Kc=4, M=3))


def make_tensors(config: GSRQConfig = CONFIG, hf=HF, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = hf["num_key_value_heads"] if config.per_head else 1
    out = {}
    for layer in range(hf["num_hidden_layers"]):
        for kind in ("keys", "values"):
            kc = config.kind(kind)
            shape = (h, hf["head_dim"] // kc.D, kc.M, kc.Kc, kc.D)
            out[f"layers.{layer}.{kind}.codebooks"] = rng.standard_normal(shape).astype(np.float32)
    out["layers.0.keys.scale"] = rng.uniform(0.5, 2, size=(h, hf["head_dim"])).astype(np.float32)
    return out


def make(config: GSRQConfig = CONFIG, hf=HF, dtype: str = "float16") -> Codebooks:
    calibration = {"text": "wiki", "tokens": 4096, "tau": 1.0, "seed": 0}
    return Codebooks.build(config, hf, make_tensors(config, hf), calibration, "test/tiny-llama", dtype=dtype)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bfloat16, in plain integer arithmetic (finite inputs)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("per_head", [False, True])
def test_round_trip(tmp_path, dtype, per_head):
    config = CONFIG.replace(per_head=per_head)
    cb = make(config, dtype=dtype)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    back = Codebooks.load(path)
    assert back.config == config
    assert back.dtype == dtype
    assert back.meta == cb.meta
    assert (back.num_layers, back.head_dim, back.num_kv_heads) == (3, 16, 2)
    round_fn = {
        "float16": lambda a: a.astype(np.float16).astype(np.float32),
        "bfloat16": bf16_round,
        "float32": lambda a: a,
    }[dtype]
    for name, t in cb.tensors.items():
        got = back.tensors[name]
        assert got.dtype == np.float32 and got.shape == t.shape
        np.testing.assert_array_equal(got, round_fn(t))
    h = 2 if per_head else 1
    assert back.codebooks(1, "keys").shape == (h, 2, 2, 16, 8)
    assert back.codebooks(2, "values").shape == (h, 1, 3, 4, 16)
    np.testing.assert_array_equal(back.aux(0, "keys", "scale"), round_fn(cb.aux(0, "keys", "scale")))
    assert back.aux(1, "keys", "scale") is None


def test_save_with_another_dtype_and_from_bytes(tmp_path):
    cb = make(dtype="float16")
    path = tmp_path / "cb32.safetensors"
    cb.save(path, dtype="float32")
    back = Codebooks.from_bytes(path.read_bytes())
    assert back.dtype == "float32"
    np.testing.assert_array_equal(back.codebooks(0, "keys"), cb.codebooks(0, "keys"))
    with pytest.raises(InvalidValueError, match="dtype"):
        cb.save(tmp_path / "x.safetensors", dtype="int8")


def test_tensors_are_read_only_copies():
    tensors = make_tensors()
    cb = Codebooks.build(CONFIG, HF, tensors, {}, "m")
    tensors["layers.0.keys.codebooks"][...] = np.nan  # the caller's array, not ours
    assert np.isfinite(cb.codebooks(0, "keys")).all()
    with pytest.raises(ValueError):
        cb.codebooks(0, "keys")[0, 0, 0, 0, 0] = 1.0


def test_accessor_errors():
    cb = make()
    with pytest.raises(InvalidValueError, match="layer"):
        cb.codebooks(3, "keys")
    with pytest.raises(InvalidValueError, match="kind"):
        cb.codebooks(0, "queries")


# ------------------------------------------------------------ interoperability


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_safetensors_library_reads_our_files(tmp_path, dtype):
    cb = make(dtype=dtype)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    loaded = safetensors_numpy.load_file(str(path))
    assert set(loaded) == set(cb.tensors)
    for name, arr in loaded.items():
        assert arr.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(arr.astype(np.float32), Codebooks.load(path).tensors[name])
    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["gsrq"])
    assert meta["format_version"] == 1
    assert meta["model"]["num_layers"] == 3
    assert meta["config"] == CONFIG.to_dict()
    assert meta["dtype"] == dtype
    # the header is padded so that tensor data starts 8-byte aligned
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0


def test_safetensors_library_reads_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    cb = make(dtype="bfloat16")
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    for name, t in load_file(str(path)).items():
        assert t.dtype == torch.bfloat16
        np.testing.assert_array_equal(t.float().numpy(), bf16_round(cb.tensors[name]))


def test_we_read_files_written_by_the_safetensors_library(tmp_path):
    cb = make(dtype="float32")
    path = tmp_path / "ref.safetensors"
    meta = cb.meta
    meta["dtype"] = "float16"
    safetensors_numpy.save_file(
        {k: v.astype(np.float16) for k, v in cb.tensors.items()},
        str(path),
        metadata={"gsrq": json.dumps(meta)},
    )
    back = Codebooks.load(path)
    for name, t in cb.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], t.astype(np.float16).astype(np.float32))


# ------------------------------------------------------------ bad files


def _saved(tmp_path, dtype="float16") -> bytes:
    path = tmp_path / "good.safetensors"
    make(dtype=dtype).save(path)
    return path.read_bytes()


def test_truncated_files(tmp_path):
    data = _saved(tmp_path)
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (0, 4, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(data) - 1):
        with pytest.raises(CodebookFormatError):
            Codebooks.from_bytes(data[:cut])
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CodebookFormatError, match="truncated"):
        Codebooks.load(p)


def test_corrupted_files(tmp_path):
    data = _saved(tmp_path)
    (n,) = struct.unpack("<Q", data[:8])
    with pytest.raises(CodebookFormatError, match="JSON"):
        Codebooks.from_bytes(data[:9] + b"#" + data[10:])
    with pytest.raises(CodebookFormatError, match="header length"):
        Codebooks.from_bytes(struct.pack("<Q", 2**62) + data[8:])
    # a NaN in the first tensor's data (float16 0x7e00), named with its index
    header = json.loads(data[8 : 8 + n])
    first = min((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")[1]
    bad = bytearray(data)
    bad[8 + n + 6 : 8 + n + 8] = b"\x00\x7e"
    with pytest.raises(CodebookFormatError, match=rf"{first} holds NaN at flat index 3"):
        Codebooks.from_bytes(bytes(bad))


def _rewrite_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data[8 + n :]


def _meta_edit(fn):
    def edit(header):
        meta = json.loads(header["__metadata__"]["gsrq"])
        fn(meta)
        header["__metadata__"]["gsrq"] = json.dumps(meta)

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_meta_edit(lambda m: m.update(format_version=2)), "unsupported format_version 2"),
        (_meta_edit(lambda m: m["model"].update(num_layers=4)), "layers.3.keys.codebooks is missing"),
        (_meta_edit(lambda m: m["model"].update(num_kv_heads=0)), "model.num_kv_heads"),
        (_meta_edit(lambda m: m["config"].update(per_head=True)), "layers.0.keys.codebooks has shape"),
        (_meta_edit(lambda m: m["config"]["keys"].update(M=3)), "layers.0.keys.codebooks has shape"),
        (_meta_edit(lambda m: m["config"]["values"].update(D=5)), "config.values.D"),
        (_meta_edit(lambda m: m.pop("calibration")), "calibration is missing"),
        (_meta_edit(lambda m: m.update(dtype="float32")), "stored as float16 but metadata field dtype says float32"),
        (_meta_edit(lambda m: m["config"].update(sinks=-1)), "metadata field config is invalid"),
        (_meta_edit(lambda m: m["config"].update(bogus=1)), "metadata field config is invalid"),
        (lambda h: h["layers.1.keys.codebooks"].update(dtype="I32"), 'unsupported dtype "I32"'),
        (lambda h: h["layers.1.keys.codebooks"].update(shape=[1, 2, 2, 16, 4]), "needs 512 bytes, data_offsets"),
        (lambda h: h.update({"embed.weight": h.pop("layers.0.keys.scale")}), 'unexpected tensor name "embed.weight"'),
        (lambda h: h["__metadata__"].update(gsrq="{not json"), "not valid JSON"),
    ],
)
def test_inconsistent_files_name_the_field(tmp_path, edit, message):
    data = _rewrite_header(_saved(tmp_path), edit)
    with pytest.raises(CodebookFormatError, match=message):
        Codebooks.from_bytes(data)


def test_foreign_safetensors_files(tmp_path):
    rng = np.random.default_rng(0)
    plain = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file({"weight": rng.standard_normal((4, 4)).astype(np.float32)}, str(plain))
    with pytest.raises(CodebookFormatError, match="__metadata__"):
        Codebooks.load(plain)
    tagged = tmp_path / "tagged.safetensors"
    safetensors_numpy.save_file({"w": np.zeros(3, np.float32)}, str(tagged), metadata={"format": "pt"})
    with pytest.raises(CodebookFormatError, match="not a gsrq codebook file"):
        Codebooks.load(tagged)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello world, this is not a safetensors file at all")
    with pytest.raises(CodebookFormatError):
        Codebooks.load(text)
    with pytest.raises(OSError):
        Codebooks.load(tmp_path / "missing.safetensors")


def test_random_mutations_raise_only_codebook_format_errors(tmp_path):
    data = _saved(tmp_path)
    (n,) = struct.unpack("<Q", data[:8])
    rng = np.random.default_rng(42)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        buf = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            end = min(8 + n, len(buf))
            if end <= 8:
                break
            op = rng.integers(0, 4)
            if op == 0:
                buf[rng.integers(0, len(buf))] = rng.integers(0, 256)
            elif op == 1:
                buf[rng.integers(8, end)] = rng.integers(0, 256)
            elif op == 2:
                digits = [i for i in range(8, end) if 0x30 <= buf[i] <= 0x39]
                if digits:
                    buf[digits[rng.integers(0, len(digits))]] = ord("0") + rng.integers(0, 10)
            else:
                del buf[rng.integers(8, len(buf)) :]
        try:
            Codebooks.from_bytes(bytes(buf))
            outcomes["ok"] += 1
        except CodebookFormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0


# ------------------------------------------------------------ atomic writes


def test_failed_save_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "cb.safetensors"
    make().save(path)
    before = path.read_bytes()
    # a tensor that float16 cannot hold: refused before anything is written
    tensors = make_tensors()
    tensors["layers.2.values.codebooks"][0, 0, 1, 2, 3] = 1e9
    cb = Codebooks.build(CONFIG, HF, tensors, {}, "m", dtype="float32")
    with pytest.raises(InvalidValueError, match=r"layers.2.values.codebooks value 1000000000 at flat index \d+ overflows float16"):
        cb.save(path, dtype="float16")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cb.safetensors"]


def test_failed_rename_removes_the_temporary(tmp_path):
    target = tmp_path / "occupied"
    (target / "inside").mkdir(parents=True)  # a non-empty directory: the final rename fails
    with pytest.raises(OSError, match="occupied"):
        make().save(target)
    assert sorted(os.listdir(tmp_path)) == ["occupied"]
    with pytest.raises(OSError):
        make().save(tmp_path / "no" / "such" / "dir.safetensors")


def test_constructor_validates():
    tensors = make_tensors()
    tensors.pop("layers.1.values.codebooks")
    with pytest.raises(CodebookFormatError, match="layers.1.values.codebooks is missing"):
        Codebooks.build(CONFIG, HF, tensors, {}, "m")
    tensors = make_tensors()
    tensors["layers.0.values.codebooks"][0, 0, 0, 0, 0] = np.inf
    with pytest.raises(InvalidValueError, match="layers.0.values.codebooks value inf at flat index 0"):
        Codebooks.build(CONFIG, HF, tensors, {}, "m")
    with pytest.raises(ShapeError, match="float32"):
        _gsrq.validate_codebook("{}", {"x": np.zeros(3, np.int32)}, "float32")
    with pytest.raises(ConfigError, match="does not divide head_dim"):
        Codebooks.build(GSRQConfig(keys=KindConfig(D=32)), HF, make_tensors(), {}, "m")
    with pytest.raises(CodebookFormatError, match="JSON"):
        Codebooks.build(CONFIG, HF, make_tensors(), {"ppl": float("nan")}, "m")


# ------------------------------------------------------------ model checks


def test_fingerprint():
    fp = model_fingerprint(HF)
    assert fp["head_dim"] == 16 and fp["rope_theta"] == 10000.0 and len(fp["config_hash"]) == 64
    no_head_dim = {k: v for k, v in HF.items() if k not in ("head_dim", "num_key_value_heads")}
    fp2 = model_fingerprint(no_head_dim)
    assert fp2["head_dim"] == 96 // 6 and fp2["num_key_value_heads"] == 6
    assert fp2["config_hash"] != fp["config_hash"]
    assert model_fingerprint({**HF, "vocab_size": 1001})["config_hash"] != fp["config_hash"]
    with pytest.raises(InvalidValueError, match="num_hidden_layers"):
        model_fingerprint({**HF, "num_hidden_layers": None})


def test_check_model_names_the_field():
    cb = make()
    cb.check_model(HF)
    with pytest.raises(ModelMismatchError, match=r"test/tiny-llama.*num_key_value_heads 2 \(file\) != 8 \(model\)"):
        cb.check_model({**HF, "num_key_value_heads": 8})
    with pytest.raises(ModelMismatchError, match=r"num_hidden_layers 3 \(file\) != 30 \(model\)"):
        cb.check_model({**HF, "num_hidden_layers": 30})
    with pytest.raises(ModelMismatchError, match=r"rope_theta 10000.0 \(file\) != 500000.0 \(model\)"):
        cb.check_model({**HF, "rope_parameters": {"rope_theta": 500000.0}})
    with pytest.raises(ModelMismatchError, match="model_type llama"):
        cb.check_model({**HF, "model_type": "qwen2"})


def test_check_model_with_a_transformers_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, hidden_size=96, vocab_size=1000
    )
    cb = Codebooks.build(CONFIG, hf, make_tensors(), {"tokens": 1}, "tiny")
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    back = Codebooks.load(path)
    back.check_model(hf)
    back.check_model(hf.to_dict())
    other = transformers.LlamaConfig(
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, hidden_size=96, vocab_size=1000
    )
    with pytest.raises(ModelMismatchError, match=r"num_key_value_heads 2 \(file\) != 3 \(model\)"):
        back.check_model(other)
