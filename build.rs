//! Build script: with the `python` feature (the extension module that maturin
//! packs into the wheel), compile the CUDA kernels into
//! `python/gsrq/_kernels/` by running `cuda/build.py` with the build's Python
//! (`$PYO3_PYTHON`, else `python3`). nvcc comes from the PyPI wheels listed in
//! pyproject's `[build-system] requires`. build.py skips files whose sources
//! did not change, so this costs nothing on rebuilds.
//!
//! `GSRQ_SKIP_CUDA=1` builds without kernels (the package then runs the
//! pure-torch reference everywhere). Without the `python` feature (plain
//! `cargo build` / `cargo test`) nothing happens.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=python/gsrq/_kernels/manifest.json");
    println!("cargo:rerun-if-env-changed=GSRQ_SKIP_CUDA");
    println!("cargo:rerun-if-env-changed=GSRQ_CUDA_ARCHS");
    println!("cargo:rerun-if-env-changed=GSRQ_NVCC");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    if env::var_os("CARGO_FEATURE_PYTHON").is_none() {
        return;
    }
    if env::var("GSRQ_SKIP_CUDA").map(|v| v == "1").unwrap_or(false) {
        println!("cargo:warning=GSRQ_SKIP_CUDA=1: building without CUDA kernels");
        return;
    }
    let root = env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let script = Path::new(&root).join("cuda").join("build.py");
    if !script.is_file() {
        // an sdist without the CUDA sources: nothing to build
        println!("cargo:warning=cuda/build.py not found: building without CUDA kernels");
        return;
    }
    let python = env::var("PYO3_PYTHON")
        .or_else(|_| env::var("PYTHON_SYS_EXECUTABLE"))
        .unwrap_or_else(|_| "python3".to_string());
    let out = Path::new(&root).join("python").join("gsrq").join("_kernels");
    let status = Command::new(&python)
        .arg(&script)
        .arg("--out")
        .arg(&out)
        .current_dir(&root)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {python} {}: {e}", script.display()));
    if !status.success() {
        panic!(
            "building the CUDA kernels failed ({status}); install nvidia-cuda-nvcc, nvidia-cuda-runtime \
             and nvidia-cuda-cccl into {python}'s environment, or set GSRQ_SKIP_CUDA=1"
        );
    }
}
