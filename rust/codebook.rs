//! The codebook file: a safetensors file whose `__metadata__` holds one key,
//! `"gsrq"`, a JSON document describing the model, the configuration and the
//! calibration (docs/format.md has the byte-exact specification).
//!
//! safetensors layout: `u64` little-endian header length `N`, `N` bytes of
//! UTF-8 JSON (`{"name": {"dtype", "shape", "data_offsets"}, ...,
//! "__metadata__": {str: str}}`, padded with spaces so the data starts on an
//! 8-byte boundary), then the tensor bytes, little-endian, offsets relative
//! to the end of the header, contiguous and covering the rest of the file.
//!
//! Tensors are stored as float16, bfloat16 or float32 (one dtype per file)
//! and handed out as `f32`. Reading checks everything a later stage would
//! otherwise trip over: header bounds, JSON, offsets, sizes, dtypes, the
//! metadata document, the presence and shape of every codebook tensor and the
//! absence of NaN/inf. Every failure is [`GsrqError::CodebookFormat`] naming
//! the field or tensor. Writing validates the same way and is atomic (temp
//! file in the same directory, fsync, rename).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use half::{bf16, f16};
use serde_json::{Map, Value};

use crate::error::{GsrqError, Result};

/// Version of the metadata document this library writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// Key of the gsrq document inside the safetensors `__metadata__`.
pub const METADATA_KEY: &str = "gsrq";
/// Largest header accepted (the safetensors library's own limit).
pub const MAX_HEADER_LEN: usize = 100 << 20;

fn fmt_err(msg: impl Into<String>) -> GsrqError {
    GsrqError::CodebookFormat(msg.into())
}

/// Storage dtype of the tensors of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F16,
    BF16,
    F32,
}

impl Dtype {
    /// The name used in the metadata and the Python API.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::F32 => "float32",
        }
    }

    /// Parses `"float16" | "bfloat16" | "float32"`.
    pub fn from_name(s: &str) -> Option<Dtype> {
        match s {
            "float16" => Some(Dtype::F16),
            "bfloat16" => Some(Dtype::BF16),
            "float32" => Some(Dtype::F32),
            _ => None,
        }
    }

    /// The safetensors dtype tag.
    pub fn safetensors_tag(self) -> &'static str {
        match self {
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
        }
    }

    fn from_safetensors_tag(s: &str) -> Option<Dtype> {
        match s {
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            "F32" => Some(Dtype::F32),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
        }
    }
}

/// A borrowed tensor to write: row-major `f32` data of `shape`.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub data: &'a [f32],
}

/// A tensor read from a file, converted to `f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A parsed and validated codebook file.
#[derive(Clone, Debug)]
pub struct CodebookFile {
    /// The `"gsrq"` metadata document, verbatim.
    pub meta_json: String,
    pub tensors: BTreeMap<String, Tensor>,
    pub dtype: Dtype,
}

// ------------------------------------------------------------- the metadata

/// What validation needs from the metadata document.
#[derive(Clone, Debug)]
struct Meta {
    num_layers: u64,
    num_kv_heads: u64,
    head_dim: u64,
    per_head: bool,
    /// (D, Kc, M) of keys and values.
    kinds: [(u64, u64, u64); 2],
    dtype: Dtype,
}

const KINDS: [&str; 2] = ["keys", "values"];

fn get<'a>(obj: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| fmt_err(format!("metadata field {path}{key} is missing")))
}

fn get_obj<'a>(
    obj: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<&'a Map<String, Value>> {
    get(obj, path, key)?
        .as_object()
        .ok_or_else(|| fmt_err(format!("metadata field {path}{key} must be an object")))
}

fn get_str<'a>(obj: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a str> {
    get(obj, path, key)?
        .as_str()
        .ok_or_else(|| fmt_err(format!("metadata field {path}{key} must be a string")))
}

fn get_pos_int(obj: &Map<String, Value>, path: &str, key: &str) -> Result<u64> {
    match get(obj, path, key)?.as_u64() {
        Some(v) if v >= 1 => Ok(v),
        _ => Err(fmt_err(format!(
            "metadata field {path}{key} must be a positive integer, got {}",
            obj[key]
        ))),
    }
}

fn parse_meta(meta_json: &str) -> Result<Meta> {
    let doc: Value = serde_json::from_str(meta_json).map_err(|e| {
        fmt_err(format!(
            "metadata \"{METADATA_KEY}\" is not valid JSON: {e}"
        ))
    })?;
    let root = doc
        .as_object()
        .ok_or_else(|| fmt_err(format!("metadata \"{METADATA_KEY}\" must be a JSON object")))?;
    let version = get(root, "", "format_version")?;
    match version.as_u64() {
        Some(FORMAT_VERSION) => {}
        _ => {
            return Err(fmt_err(format!(
                "unsupported format_version {version} (this gsrq reads version {FORMAT_VERSION})"
            )))
        }
    }
    get_str(root, "", "library_version")?;
    get_obj(root, "", "calibration")?;
    let dtype_name = get_str(root, "", "dtype")?;
    let dtype = Dtype::from_name(dtype_name).ok_or_else(|| {
        fmt_err(format!(
            "metadata field dtype must be float16, bfloat16 or float32, got {dtype_name:?}"
        ))
    })?;

    let model = get_obj(root, "", "model")?;
    get_str(model, "model.", "id")?;
    get_str(model, "model.", "config_hash")?;
    get_str(model, "model.", "model_type")?;
    let num_layers = get_pos_int(model, "model.", "num_layers")?;
    let num_kv_heads = get_pos_int(model, "model.", "num_kv_heads")?;
    get_pos_int(model, "model.", "num_attention_heads")?;
    let head_dim = get_pos_int(model, "model.", "head_dim")?;

    let config = get_obj(root, "", "config")?;
    let per_head = get(config, "config.", "per_head")?
        .as_bool()
        .ok_or_else(|| fmt_err("metadata field config.per_head must be a boolean"))?;
    let mut kinds = [(0, 0, 0); 2];
    for (slot, kind) in kinds.iter_mut().zip(KINDS) {
        let path = format!("config.{kind}.");
        let kc = get_obj(config, "config.", kind)?;
        let d = get_pos_int(kc, &path, "D")?;
        let k = get_pos_int(kc, &path, "Kc")?;
        let m = get_pos_int(kc, &path, "M")?;
        if head_dim % d != 0 {
            return Err(fmt_err(format!(
                "metadata field config.{kind}.D = {d} does not divide model.head_dim = {head_dim}"
            )));
        }
        if !(2..=65536).contains(&k) {
            return Err(fmt_err(format!(
                "metadata field config.{kind}.Kc must be in 2..=65536, got {k}"
            )));
        }
        *slot = (d, k, m);
    }
    Ok(Meta {
        num_layers,
        num_kv_heads,
        head_dim,
        per_head,
        kinds,
        dtype,
    })
}

impl Meta {
    /// Shape `[H, C, M, Kc, D]` of `layers.{l}.{kind}.codebooks`.
    fn codebook_shape(&self, kind: usize) -> Vec<u64> {
        let (d, k, m) = self.kinds[kind];
        let h = if self.per_head { self.num_kv_heads } else { 1 };
        vec![h, self.head_dim / d, m, k, d]
    }
}

/// Splits `layers.{l}.{kind}.{name}` (decimal `l` without leading zeros,
/// `name` of `[A-Za-z0-9_]`), or `None`.
fn parse_tensor_name(name: &str) -> Option<(u64, usize, &str)> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || (layer.len() > 1 && layer.starts_with('0'))
        || !layer.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let layer: u64 = layer.parse().ok()?;
    let (kind, leaf) = rest.split_once('.')?;
    let kind = KINDS.iter().position(|k| *k == kind)?;
    if leaf.is_empty() || !leaf.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    Some((layer, kind, leaf))
}

/// Checks names, required codebooks and their shapes against the metadata.
fn check_contents<'a>(
    meta: &Meta,
    tensors: impl Iterator<Item = (&'a str, &'a [usize])> + Clone,
) -> Result<()> {
    for (name, _) in tensors.clone() {
        match parse_tensor_name(name) {
            Some((layer, _, _)) if layer >= meta.num_layers => {
                return Err(fmt_err(format!(
                    "tensor {name:?} names layer {layer}, but model.num_layers is {}",
                    meta.num_layers
                )))
            }
            Some(_) => {}
            None => {
                return Err(fmt_err(format!(
                    "unexpected tensor name {name:?} (expected layers.<layer>.<keys|values>.<name>)"
                )))
            }
        }
    }
    let map: BTreeMap<&str, &[usize]> = tensors.collect();
    // Terminates at the first missing layer, so a huge num_layers in a
    // corrupt file costs at most len(tensors) lookups.
    for layer in 0..meta.num_layers {
        for (k, kind) in KINDS.iter().enumerate() {
            let name = format!("layers.{layer}.{kind}.codebooks");
            let Some(shape) = map.get(name.as_str()) else {
                return Err(fmt_err(format!(
                    "tensor {name} is missing (model.num_layers = {})",
                    meta.num_layers
                )));
            };
            let want = meta.codebook_shape(k);
            if shape.len() != want.len() || shape.iter().zip(&want).any(|(&a, &b)| a as u64 != b) {
                return Err(fmt_err(format!(
                    "tensor {name} has shape {shape:?}, the metadata needs {want:?} \
                     ([H, C = head_dim / D, M, Kc, D] with per_head = {})",
                    meta.per_head
                )));
            }
        }
    }
    Ok(())
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Validates a set of tensors against a metadata document without writing:
/// the checks [`write_file`] runs. Structural problems are
/// [`GsrqError::CodebookFormat`], NaN/inf or values the dtype cannot hold
/// [`GsrqError::InvalidValue`], a data length that does not match the shape
/// [`GsrqError::Shape`].
pub fn validate(meta_json: &str, tensors: &[TensorView<'_>], dtype: Dtype) -> Result<()> {
    let meta = parse_meta(meta_json)?;
    if meta.dtype != dtype {
        return Err(fmt_err(format!(
            "metadata field dtype is {} but the tensors are written as {}",
            meta.dtype.name(),
            dtype.name()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in tensors {
        if !seen.insert(t.name) {
            return Err(fmt_err(format!("tensor {:?} given twice", t.name)));
        }
        if numel(t.shape) != Some(t.data.len()) {
            return Err(GsrqError::Shape(format!(
                "tensor {} has {} values but shape {:?}",
                t.name,
                t.data.len(),
                t.shape
            )));
        }
        check_values(t.name, t.data, dtype)?;
    }
    check_contents(&meta, tensors.iter().map(|t| (t.name, t.shape)))
}

/// NaN/inf, or a finite value that overflows `dtype`.
fn check_values(name: &str, data: &[f32], dtype: Dtype) -> Result<()> {
    let bad = |v: f32| match dtype {
        Dtype::F32 => !v.is_finite(),
        Dtype::F16 => !f16::from_f32(v).is_finite(),
        Dtype::BF16 => !bf16::from_f32(v).is_finite(),
    };
    if let Some((i, &v)) = data.iter().enumerate().find(|(_, &v)| bad(v)) {
        let why = if v.is_finite() {
            format!("overflows {}", dtype.name())
        } else {
            "is not finite".to_string()
        };
        return Err(GsrqError::InvalidValue(format!(
            "tensor {name} value {v} at flat index {i} {why}"
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------ writing

/// The complete file as bytes (validated first, see [`validate`]).
pub fn to_bytes(meta_json: &str, tensors: &[TensorView<'_>], dtype: Dtype) -> Result<Vec<u8>> {
    validate(meta_json, tensors, dtype)?;
    let mut sorted: Vec<&TensorView<'_>> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(b.name));

    let mut header = Map::new();
    let mut metadata = Map::new();
    metadata.insert(
        METADATA_KEY.to_string(),
        Value::String(meta_json.to_string()),
    );
    header.insert("__metadata__".to_string(), Value::Object(metadata));
    let mut offset = 0usize;
    for t in &sorted {
        let len = t.data.len() * dtype.size();
        let mut entry = Map::new();
        entry.insert(
            "dtype".into(),
            Value::String(dtype.safetensors_tag().into()),
        );
        entry.insert("shape".into(), Value::from(t.shape.to_vec()));
        entry.insert(
            "data_offsets".into(),
            Value::from(vec![offset, offset + len]),
        );
        header.insert(t.name.to_string(), Value::Object(entry));
        offset += len;
    }
    let mut header = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| GsrqError::InvalidValue(format!("cannot serialise the header: {e}")))?;
    // pad with spaces so the data starts 8-byte aligned
    while (8 + header.len()) % 8 != 0 {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for t in &sorted {
        match dtype {
            Dtype::F32 => t
                .data
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Dtype::F16 => t
                .data
                .iter()
                .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
            Dtype::BF16 => t
                .data
                .iter()
                .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        }
    }
    Ok(out)
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory. On any
/// error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        GsrqError::InvalidValue(format!("path {} has no file name", path.display()))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let attempt = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    };
    if let Err(e) = attempt() {
        let _ = fs::remove_file(&tmp);
        return Err(GsrqError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot write codebook file {}: {e}", path.display()),
        )));
    }
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all(); // durability of the rename; not possible everywhere
    }
    Ok(())
}

/// Validates and writes a codebook file atomically (see [`write_atomic`]).
pub fn write_file(
    path: &Path,
    meta_json: &str,
    tensors: &[TensorView<'_>],
    dtype: Dtype,
) -> Result<()> {
    let bytes = to_bytes(meta_json, tensors, dtype)?;
    write_atomic(path, &bytes)
}

// ------------------------------------------------------------------ reading

struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

fn parse_entry(name: &str, v: &Value) -> Result<Entry> {
    let obj = v
        .as_object()
        .ok_or_else(|| fmt_err(format!("header entry of tensor {name:?} must be an object")))?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(fmt_err(format!(
                "header entry of tensor {name:?} has unknown field {key:?}"
            )));
        }
    }
    let tag = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| fmt_err(format!("tensor {name:?} has no string dtype")))?;
    let dtype = Dtype::from_safetensors_tag(tag).ok_or_else(|| {
        fmt_err(format!(
            "tensor {name:?} has unsupported dtype {tag:?} (expected F16, BF16 or F32)"
        ))
    })?;
    let ints = |key: &str| -> Result<Vec<usize>> {
        obj.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| fmt_err(format!("tensor {name:?} has no {key} array")))?
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        fmt_err(format!(
                            "tensor {name:?}: {key} must hold non-negative integers, got {x}"
                        ))
                    })
            })
            .collect()
    };
    let shape = ints("shape")?;
    let offsets = ints("data_offsets")?;
    let [begin, end] = offsets[..] else {
        return Err(fmt_err(format!(
            "tensor {name:?}: data_offsets must have two entries, got {offsets:?}"
        )));
    };
    if begin > end {
        return Err(fmt_err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] run backwards"
        )));
    }
    let bytes = numel(&shape)
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| fmt_err(format!("tensor {name:?}: shape {shape:?} overflows")))?;
    if bytes != end - begin {
        return Err(fmt_err(format!(
            "tensor {name:?}: shape {shape:?} of {tag} needs {bytes} bytes, data_offsets [{begin}, {end}] hold {}",
            end - begin
        )));
    }
    Ok(Entry {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

fn decode(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// Parses and validates a codebook file held in memory. Never panics on any
/// input; every defect is [`GsrqError::CodebookFormat`].
pub fn parse_bytes(data: &[u8]) -> Result<CodebookFile> {
    if data.len() < 8 {
        return Err(fmt_err(format!(
            "file is {} bytes, too short for the 8-byte safetensors header length",
            data.len()
        )));
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let rest = (data.len() - 8) as u64;
    if n > rest {
        return Err(fmt_err(format!(
            "header length {n} exceeds the {rest} bytes that follow it (truncated file?)"
        )));
    }
    if n as usize > MAX_HEADER_LEN {
        return Err(fmt_err(format!(
            "header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes"
        )));
    }
    let n = n as usize;
    let header = &data[8..8 + n];
    let body = &data[8 + n..];
    if header.first() != Some(&b'{') {
        return Err(fmt_err(
            "header does not start with '{' (not a safetensors file)",
        ));
    }
    let header =
        std::str::from_utf8(header).map_err(|e| fmt_err(format!("header is not UTF-8: {e}")))?;
    let header: Value = serde_json::from_str(header)
        .map_err(|e| fmt_err(format!("header is not valid JSON: {e}")))?;
    let header = header
        .as_object()
        .ok_or_else(|| fmt_err("header is not a JSON object"))?;

    // metadata
    let metadata = header
        .get("__metadata__")
        .ok_or_else(|| fmt_err("no __metadata__ in the header: not a gsrq codebook file"))?
        .as_object()
        .ok_or_else(|| fmt_err("__metadata__ must be an object"))?;
    for (k, v) in metadata {
        if !v.is_string() {
            return Err(fmt_err(format!(
                "__metadata__ value of {k:?} must be a string"
            )));
        }
    }
    let meta_json = metadata
        .get(METADATA_KEY)
        .and_then(Value::as_str)
        .ok_or_else(|| {
            fmt_err(format!(
                "__metadata__ has no {METADATA_KEY:?} key: not a gsrq codebook file"
            ))
        })?;
    let meta = parse_meta(meta_json)?;

    // tensor table
    let mut entries = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name != "__metadata__" {
            entries.push(parse_entry(name, v)?);
        }
    }
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut pos = 0usize;
    for e in &entries {
        if e.begin != pos {
            let what = if e.begin < pos {
                "overlaps the previous tensor"
            } else {
                "leaves a gap after the previous tensor"
            };
            return Err(fmt_err(format!(
                "tensor {:?}: data_offsets [{}, {}] {what} (expected to start at {pos})",
                e.name, e.begin, e.end
            )));
        }
        pos = e.end;
    }
    if pos != body.len() {
        return Err(fmt_err(format!(
            "tensor data covers {pos} bytes but {} bytes follow the header (truncated or trailing garbage)",
            body.len()
        )));
    }
    for e in &entries {
        if e.dtype != meta.dtype {
            return Err(fmt_err(format!(
                "tensor {:?} is stored as {} but metadata field dtype says {}",
                e.name,
                e.dtype.name(),
                meta.dtype.name()
            )));
        }
    }
    check_contents(
        &meta,
        entries
            .iter()
            .map(|e| (e.name.as_str(), e.shape.as_slice())),
    )?;

    let mut tensors = BTreeMap::new();
    for e in entries {
        let values = decode(&body[e.begin..e.end], e.dtype);
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(fmt_err(format!(
                "tensor {} holds {v} at flat index {i}",
                e.name
            )));
        }
        tensors.insert(
            e.name,
            Tensor {
                shape: e.shape,
                data: values,
            },
        );
    }
    Ok(CodebookFile {
        meta_json: meta_json.to_string(),
        tensors,
        dtype: meta.dtype,
    })
}

/// Reads, parses and validates a codebook file. I/O failures are
/// [`GsrqError::Io`]; everything else as [`parse_bytes`].
pub fn read_file(path: &Path) -> Result<CodebookFile> {
    let data = fs::read(path).map_err(|e| {
        GsrqError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot read codebook file {}: {e}", path.display()),
        ))
    })?;
    parse_bytes(&data)
}

// ---------------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(num_layers: u64, per_head: bool, dtype: &str) -> String {
        serde_json::json!({
            "format_version": 1,
            "library_version": "0.1.0",
            "model": {"id": "test/model", "config_hash": "abc", "num_layers": num_layers,
                      "num_kv_heads": 3, "num_attention_heads": 9, "head_dim": 8, "model_type": "llama"},
            "config": {"keys": {"D": 4, "Kc": 4, "M": 2}, "values": {"D": 8, "Kc": 2, "M": 1},
                       "per_head": per_head, "method": "gskm"},
            "calibration": {"tokens": 10},
            "dtype": dtype,
        })
        .to_string()
    }

    /// (name, shape, data) of a valid set for `meta(2, per_head, _)`.
    fn tensors(per_head: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let h = if per_head { 3 } else { 1 };
        let mut out = Vec::new();
        for l in 0..2 {
            for (kind, shape) in [
                ("keys", vec![h, 2, 2, 4, 4]),
                ("values", vec![h, 1, 1, 2, 8]),
            ] {
                let n: usize = shape.iter().product();
                let data = (0..n)
                    .map(|i| ((i * 7 + l) % 13) as f32 * 0.25 - 1.5)
                    .collect();
                out.push((format!("layers.{l}.{kind}.codebooks"), shape, data));
            }
        }
        out.push(("layers.1.keys.scale".into(), vec![h, 8], vec![0.5; h * 8]));
        out
    }

    fn views(t: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<TensorView<'_>> {
        t.iter()
            .map(|(n, s, d)| TensorView {
                name: n,
                shape: s,
                data: d,
            })
            .collect()
    }

    fn valid_file(dtype: Dtype) -> Vec<u8> {
        let t = tensors(false);
        to_bytes(&meta(2, false, dtype.name()), &views(&t), dtype).unwrap()
    }

    fn format_msg(r: Result<CodebookFile>) -> String {
        match r {
            Err(GsrqError::CodebookFormat(m)) => m,
            other => panic!("expected CodebookFormat, got {other:?}"),
        }
    }

    #[test]
    fn round_trip_every_dtype() {
        for per_head in [false, true] {
            for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
                let t = tensors(per_head);
                let m = meta(2, per_head, dtype.name());
                let bytes = to_bytes(&m, &views(&t), dtype).unwrap();
                assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) % 8, 0);
                let f = parse_bytes(&bytes).unwrap();
                assert_eq!(f.meta_json, m);
                assert_eq!(f.dtype, dtype);
                assert_eq!(f.tensors.len(), t.len());
                for (name, shape, data) in &t {
                    let got = &f.tensors[name];
                    assert_eq!(&got.shape, shape);
                    // test values are multiples of 0.25 in [-1.5, 1.5]: exact in every dtype
                    assert_eq!(&got.data, data);
                }
            }
        }
    }

    #[test]
    fn rounding_to_half_precision() {
        let mut t = tensors(false);
        t[0].2[0] = 1.0 + 1.0 / 4096.0; // not representable in f16 or bf16
        let m = meta(2, false, "float16");
        let f = parse_bytes(&to_bytes(&m, &views(&t), Dtype::F16).unwrap()).unwrap();
        assert_eq!(
            f.tensors[&t[0].0].data[0],
            f16::from_f32(t[0].2[0]).to_f32()
        );
        let m = meta(2, false, "bfloat16");
        let f = parse_bytes(&to_bytes(&m, &views(&t), Dtype::BF16).unwrap()).unwrap();
        assert_eq!(f.tensors[&t[0].0].data[0], 1.0);
    }

    #[test]
    fn write_validation() {
        let t = tensors(false);
        let v = views(&t);
        // meta/dtype disagreement
        assert!(
            matches!(to_bytes(&meta(2, false, "float32"), &v, Dtype::F16), Err(GsrqError::CodebookFormat(m)) if m.contains("dtype"))
        );
        // a missing layer
        let e = to_bytes(&meta(3, false, "float16"), &v, Dtype::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layers.2.keys.codebooks is missing"), "{e}");
        // per_head needs H = num_kv_heads
        let e = to_bytes(&meta(2, true, "float16"), &v, Dtype::F16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layers.0.keys.codebooks has shape [1, 2, 2, 4, 4]")
                && e.contains("[3, 2, 2, 4, 4]"),
            "{e}"
        );
        // NaN and f16 overflow
        let mut bad = tensors(false);
        bad[1].2[5] = f32::NAN;
        let e = to_bytes(&meta(2, false, "float32"), &views(&bad), Dtype::F32).unwrap_err();
        assert!(
            matches!(&e, GsrqError::InvalidValue(m) if m.contains("layers.0.values.codebooks") && m.contains("index 5")),
            "{e}"
        );
        bad[1].2[5] = 1e6;
        let e = to_bytes(&meta(2, false, "float16"), &views(&bad), Dtype::F16).unwrap_err();
        assert!(
            matches!(&e, GsrqError::InvalidValue(m) if m.contains("overflows float16")),
            "{e}"
        );
        assert!(to_bytes(&meta(2, false, "float32"), &views(&bad), Dtype::F32).is_ok());
        // data length vs shape
        let mut bad = tensors(false);
        bad[0].2.pop();
        assert!(matches!(
            to_bytes(&meta(2, false, "float16"), &views(&bad), Dtype::F16),
            Err(GsrqError::Shape(_))
        ));
        // foreign names
        let mut bad = tensors(false);
        bad.push(("model.embed".into(), vec![1], vec![0.0]));
        let e = to_bytes(&meta(2, false, "float16"), &views(&bad), Dtype::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unexpected tensor name \"model.embed\""), "{e}");
        for name in [
            "layers.01.keys.x",
            "layers.0.queries.x",
            "layers.0.keys.",
            "layers.0.keys.a-b",
        ] {
            let mut bad = tensors(false);
            bad.push((name.into(), vec![1], vec![0.0]));
            assert!(
                to_bytes(&meta(2, false, "float16"), &views(&bad), Dtype::F16).is_err(),
                "{name}"
            );
        }
        let mut bad = tensors(false);
        bad.push(("layers.2.keys.scale".into(), vec![1], vec![0.0]));
        let e = to_bytes(&meta(2, false, "float16"), &views(&bad), Dtype::F16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("names layer 2"), "{e}");
    }

    type MetaEdit = Box<dyn Fn(&mut Value)>;

    #[test]
    fn metadata_fields_are_checked_by_name() {
        let base: Value = serde_json::from_str(&meta(2, false, "float16")).unwrap();
        let cases: Vec<(&str, MetaEdit)> = vec![
            (
                "format_version",
                Box::new(|m| m["format_version"] = 2.into()),
            ),
            (
                "format_version",
                Box::new(|m| {
                    m.as_object_mut().unwrap().remove("format_version");
                }),
            ),
            (
                "library_version",
                Box::new(|m| m["library_version"] = 1.into()),
            ),
            (
                "model.num_layers",
                Box::new(|m| m["model"]["num_layers"] = 0.into()),
            ),
            (
                "model.head_dim",
                Box::new(|m| m["model"]["head_dim"] = "8".into()),
            ),
            (
                "model.id",
                Box::new(|m| {
                    m["model"].as_object_mut().unwrap().remove("id");
                }),
            ),
            (
                "config.keys.D",
                Box::new(|m| m["config"]["keys"]["D"] = 3.into()),
            ),
            (
                "config.values.Kc",
                Box::new(|m| m["config"]["values"]["Kc"] = 1.into()),
            ),
            (
                "config.per_head",
                Box::new(|m| m["config"]["per_head"] = 1.into()),
            ),
            ("calibration", Box::new(|m| m["calibration"] = "x".into())),
            ("dtype", Box::new(|m| m["dtype"] = "int8".into())),
        ];
        let t = tensors(false);
        for (field, mutate) in cases {
            let mut m = base.clone();
            mutate(&mut m);
            let e = to_bytes(&m.to_string(), &views(&t), Dtype::F16)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    /// Rewrites the header of a valid file through `f` (re-padded, lengths fixed).
    fn with_header(bytes: &[u8], f: impl FnOnce(&mut Map<String, Value>)) -> Vec<u8> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        f(h.as_object_mut().unwrap());
        let hb = serde_json::to_vec(&h).unwrap();
        let mut out = (hb.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&hb);
        out.extend_from_slice(&bytes[8 + n..]);
        out
    }

    #[test]
    fn read_validation() {
        let good = valid_file(Dtype::F16);
        assert!(format_msg(parse_bytes(&good[..5])).contains("too short"));
        assert!(format_msg(parse_bytes(&good[..100])).contains("truncated"));
        assert!(format_msg(parse_bytes(&good[..good.len() - 1])).contains("truncated"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(format_msg(parse_bytes(&longer)).contains("trailing"));
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(format_msg(parse_bytes(&huge)).contains("header length"));

        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            h.remove("__metadata__");
        })));
        assert!(m.contains("__metadata__"), "{m}");
        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            h.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        })));
        assert!(m.contains("not a gsrq codebook file"), "{m}");
        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            h["layers.0.keys.codebooks"]["dtype"] = "F64".into();
        })));
        assert!(m.contains("unsupported dtype \"F64\""), "{m}");
        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            h["layers.0.keys.codebooks"]["dtype"] = "F32".into();
        })));
        assert!(
            m.contains("layers.0.keys.codebooks") && m.contains("needs"),
            "{m}"
        );
        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            h["layers.0.keys.codebooks"]["shape"] = serde_json::json!([1, 2, 2, 4, 2, 2]);
        })));
        assert!(
            m.contains("layers.0.keys.codebooks has shape [1, 2, 2, 4, 2, 2]"),
            "{m}"
        );
        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            h["layers.0.keys.codebooks"]["shape"] = serde_json::json!([1, 2, 2, 4, -4]);
        })));
        assert!(m.contains("non-negative"), "{m}");
        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            h["layers.0.keys.codebooks"]["extra"] = 1.into();
        })));
        assert!(m.contains("unknown field \"extra\""), "{m}");
        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            h.remove("layers.1.values.codebooks");
        })));
        assert!(m.contains("gap") || m.contains("covers"), "{m}");
        // swap the offsets of two equal-sized tensors: still valid, data swapped
        let swapped = with_header(&good, |h| {
            let a = h["layers.0.keys.codebooks"]["data_offsets"].clone();
            let b = h["layers.1.keys.codebooks"]["data_offsets"].clone();
            h["layers.0.keys.codebooks"]["data_offsets"] = b;
            h["layers.1.keys.codebooks"]["data_offsets"] = a;
        });
        let f = parse_bytes(&swapped).unwrap();
        let g = parse_bytes(&good).unwrap();
        assert_eq!(
            f.tensors["layers.0.keys.codebooks"],
            g.tensors["layers.1.keys.codebooks"]
        );
        // overlap
        let m = format_msg(parse_bytes(&with_header(&good, |h| {
            let a = h["layers.0.keys.codebooks"]["data_offsets"].clone();
            h["layers.1.keys.codebooks"]["data_offsets"] = a;
        })));
        assert!(m.contains("overlaps"), "{m}");
        // NaN in the data of a codebook (f16 0x7E00)
        let mut nan = good.clone();
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let f = parse_bytes(&good).unwrap();
        let _ = f;
        nan[8 + n] = 0x00;
        nan[8 + n + 1] = 0x7E;
        let m = format_msg(parse_bytes(&nan));
        assert!(m.contains("NaN") && m.contains("flat index 0"), "{m}");
        // not JSON, not UTF-8, not an object
        let mut junk = good.clone();
        junk[9] = b'!';
        assert!(format_msg(parse_bytes(&junk)).contains("JSON"));
        junk[9] = 0xFF;
        assert!(format_msg(parse_bytes(&junk)).contains("UTF-8"));
    }

    #[test]
    fn atomic_write_and_read_back() {
        let dir = std::env::temp_dir().join(format!("gsrq-codebook-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cb.safetensors");
        let t = tensors(true);
        write_file(&path, &meta(2, true, "bfloat16"), &views(&t), Dtype::BF16).unwrap();
        let f = read_file(&path).unwrap();
        assert_eq!(f.tensors["layers.1.keys.scale"].data, vec![0.5; 24]);
        // a failing write leaves the old file and no temporary behind
        let mut bad = tensors(true);
        bad[2].2[0] = f32::INFINITY;
        assert!(write_file(&path, &meta(2, true, "float32"), &views(&bad), Dtype::F32).is_err());
        assert!(read_file(&path).is_ok());
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // a directory in place of the target: rename fails, temp removed
        let blocked = dir.join("sub");
        fs::create_dir_all(blocked.join("x")).unwrap();
        assert!(matches!(
            write_file(
                &blocked,
                &meta(2, true, "bfloat16"),
                &views(&t),
                Dtype::BF16
            ),
            Err(GsrqError::Io(_))
        ));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
        assert!(matches!(
            read_file(&dir.join("missing")),
            Err(GsrqError::Io(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        SetByte(prop::sample::Index, u8),
        SetHeaderByte(prop::sample::Index, u8),
        SetHeaderDigit(prop::sample::Index, u8),
        Truncate(prop::sample::Index),
        Append(Vec<u8>),
        SetLength(u64),
        Remove(prop::sample::Index, usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
            (any::<prop::sample::Index>(), any::<u8>())
                .prop_map(|(i, b)| Mutation::SetHeaderByte(i, b)),
            (any::<prop::sample::Index>(), 0u8..10)
                .prop_map(|(i, d)| Mutation::SetHeaderDigit(i, d)),
            any::<prop::sample::Index>().prop_map(Mutation::Truncate),
            prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
            (0u64..4096).prop_map(Mutation::SetLength),
            (any::<prop::sample::Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Remove(i, n)),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
        // header length as recorded, clamped to the bytes present (an earlier
        // mutation may have broken it)
        let n = (u64::from_le_bytes(bytes[..8].try_into().unwrap()).min((bytes.len() - 8) as u64))
            as usize;
        match m {
            Mutation::SetHeaderByte(..) if n == 0 => {}
            Mutation::SetByte(i, b) => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::SetHeaderByte(i, b) => {
                let i = 8 + i.index(n);
                bytes[i] = *b;
            }
            Mutation::SetHeaderDigit(i, d) => {
                let digits: Vec<usize> =
                    (8..8 + n).filter(|&j| bytes[j].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    bytes[digits[i.index(digits.len())]] = b'0' + d;
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::Append(extra) => bytes.extend_from_slice(extra),
            Mutation::SetLength(len) => bytes[..8].copy_from_slice(&len.to_le_bytes()),
            Mutation::Remove(i, k) => {
                let i = i.index(bytes.len());
                let end = (i + k).min(bytes.len());
                bytes.drain(i..end);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Random corruption never panics: the result is a valid file or a
        /// CodebookFormat error.
        #[test]
        fn mutations_never_panic(dtype in prop_oneof![Just(Dtype::F16), Just(Dtype::BF16), Just(Dtype::F32)],
                                 muts in prop::collection::vec(mutation(), 1..4)) {
            let mut bytes = valid_file(dtype);
            for m in &muts {
                if bytes.len() < 8 { break; }
                apply(&mut bytes, m);
            }
            match parse_bytes(&bytes) {
                Ok(f) => {
                    for t in f.tensors.values() {
                        prop_assert_eq!(numel(&t.shape), Some(t.data.len()));
                        prop_assert!(t.data.iter().all(|v| v.is_finite()));
                    }
                }
                Err(GsrqError::CodebookFormat(_)) => {}
                Err(e) => prop_assert!(false, "unexpected error kind: {:?}", e),
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let is_format = matches!(parse_bytes(&bytes), Err(GsrqError::CodebookFormat(_)));
            prop_assert!(is_format);
        }

        #[test]
        fn round_trip_random_values(vals in prop::collection::vec(-60000f32..60000f32, 64)) {
            let mut t = tensors(false);
            t[0].2.copy_from_slice(&vals);
            for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
                let f = parse_bytes(&to_bytes(&meta(2, false, dtype.name()), &views(&t), dtype).unwrap()).unwrap();
                let want: Vec<f32> = match dtype {
                    Dtype::F32 => vals.clone(),
                    Dtype::F16 => vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                    Dtype::BF16 => vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                };
                prop_assert_eq!(&f.tensors["layers.0.keys.codebooks"].data, &want);
            }
        }
    }
}
