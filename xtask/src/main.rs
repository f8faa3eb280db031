//! `cargo xtask <task>`: the project's chores in one place, cheapest checks first.
//!
//! - `ci`: rustfmt check, clippy (warnings are errors), fetch the model, the workspace tests,
//!   the kernel crate's aarch64 (NEON) tests under qemu where the cross tools are installed, and
//!   the downstream example crates, `kernels-cubecl`'s tests and needle-model's CubeCL arm on wgpu
//!   (lavapipe) in one cargo run (its ops against the CPU references and the default model
//!   against the CPU path), the CUDA test bundle (built, not run), and the Python package's pytest
//!   suite on the extension module the workspace build made, with the Ray Serve example's test
//!   (two replicas on a local Ray cluster) where `ray[serve]` installs. `.ci/run` runs exactly this.
//! - `ray`: the Ray Serve example's test alone (installs `ray[serve]` into the package's virtual
//!   environment).
//! - `fetch-model`: puts the verified SmolLM2 and Gemma 3 270M GGUFs and the default document in the cache (see
//!   `needle-fetch`).
//! - `test-gpu [--build-only] [--out DIR]`: `kernels-cubecl`'s clippy (wgpu and cuda features),
//!   needle-model's clippy with each of them, and the kernel tests on CUDA, or a bundle to carry
//!   to a GPU machine: the kernel tests, the model tests at real shapes, the benchmark
//!   (`gpu_bench`) and the `needle` binary, all built with `cuda`, stripped and packed into one
//!   gzip'd tar, and `run.sh` (see [`TEST_GPU_HELP`] for the device invocation).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <ci | fetch-model | ray | test-gpu [--build-only] [--out DIR]>";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("fetch-model") => fetch_model().map(|_| ()),
        Some("ray") => ray(),
        Some("test-gpu") => test_gpu(&args[1..]),
        Some(other) => bail!("unknown task `{other}`\n{USAGE}"),
        None => bail!("{USAGE}"),
    }
}

/// The workspace root. `cargo run` sets `CARGO_MANIFEST_DIR` for the running binary: read it at
/// run time, since a build cache shared by several clones may hold an xtask built in another one.
fn root() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    manifest.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn cargo(args: &[&str], dir: &Path) -> Result<()> {
    cargo_env(args, dir, &[])
}

/// [`cargo`] with extra environment variables.
fn cargo_env(args: &[&str], dir: &Path, envs: &[(&str, &str)]) -> Result<()> {
    let shown: Vec<String> = envs.iter().map(|(k, v)| format!("{k}='{v}' ")).collect();
    eprintln!("\n==> {}cargo {} ({})", shown.concat(), args.join(" "), dir.display());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status =
        Command::new(cargo).args(args).envs(envs.iter().copied()).current_dir(dir).status().context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn fetch_model() -> Result<PathBuf> {
    eprintln!("\n==> fetch-model");
    let path = needle_fetch::ensure_default_model().context("fetching the default model")?;
    if std::env::var_os("NEEDLE_MODEL").is_none() {
        needle_fetch::verify(&path, needle_fetch::DEFAULT_MODEL_SHA256)?;
    }
    eprintln!("model ready: {}", path.display());
    let gemma = &needle_fetch::GEMMA3_270M;
    let g = needle_fetch::ensure_model(gemma).context("fetching gemma3-270m")?;
    needle_fetch::verify(&g, gemma.sha256)?;
    eprintln!("model ready: {} ({})", g.display(), gemma.licence);
    // The README's main job reads the default document; CI fetches it here, beside the model.
    let doc = needle_fetch::ensure_default_document().context("fetching the default document")?;
    eprintln!("document ready: {}", doc.display());
    Ok(path)
}

/// Downstream crates under `examples/` that stand for a user's own project.
fn example_crates(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("examples"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    v.sort();
    v
}

fn ci() -> Result<()> {
    let root = root();
    cargo(&["fmt", "--all", "--check"], &root)?;
    // The default members: the CPU build. `kernels-cubecl`'s clippy is `test-gpu`'s (a clippy
    // pass over the cubecl/wgpu stack is minutes of a cold run).
    // `needle-model/autodiff`: its `NeedleBackend` for `Autodiff<B>` and that test.
    let cpu = ["--locked", "--features", "needle-model/autodiff"];
    cargo(&[&["clippy", "--all-targets"][..], &cpu, &["--", "-D", "warnings"]].concat(), &root)?;
    fetch_model()?;
    cargo(&[&["test"][..], &cpu].concat(), &root)?;
    serve_clients(&root)?;
    aarch64_tests(&root)?;
    // The CubeCL kernels and the CubeCL arm of needle-model's backend on wgpu over Mesa's
    // software Vulkan (.ci/run installs it), in one cargo run so the cubecl/wgpu stack is built
    // once: every kernel against f64 references, each arm op against the CPU reference, the
    // default model and random-weight models of real shapes against the CPU path.
    let gpu = ["-p", "needle-kernels-cubecl", "-p", "needle-model", "--features", "needle-model/wgpu", "--locked"];
    let targets = [
        "--lib",
        "--test",
        "gpu",
        "--test",
        "wgpu_arms",
        "--test",
        "wgpu_model",
        "--test",
        "wgpu_sparse_prefill",
        "--test",
        "gpu_shapes",
    ];
    cargo(&[&["test"][..], &gpu, &targets].concat(), &root)?;
    // No GPU here: the CUDA bundle must still build.
    test_gpu(&["--build-only".into()])?;
    for ex in example_crates(&root) {
        cargo(&["test"], &ex)?;
    }
    // The Ray Serve example too (two replicas on a local cluster) where `ray[serve]` installs;
    // without it (no network, or no wheel for this Python) CI says so and runs the rest.
    let ray = python_env(&[RAY]).map_err(|e| eprintln!("\n==> ray: SKIPPED examples/ray-serve ({e:#})")).is_ok();
    let tests: &[&str] = if ray { &["python/tests", "examples/ray-serve"] } else { &["python/tests"] };
    python_tests(&root, tests, &[])?;
    eprintln!("\nci: all checks passed");
    Ok(())
}

/// `needle serve` asked by the official `openai` Python package and curl
/// (`tests/serve/openai_client.py`, on the `needle` binary `cargo test` just built). Skipped,
/// saying why, when no Python with `openai` is found (`NEEDLE_SERVE_PYTHON`, else the venv
/// `~/.cache/needle/serve-venv`, else `python3`) or curl is missing.
fn serve_clients(root: &Path) -> Result<()> {
    let venv = needle_fetch::cache_dir().ok().and_then(|m| m.parent().map(|p| p.join("serve-venv/bin/python")));
    let python = std::env::var_os("NEEDLE_SERVE_PYTHON")
        .map(PathBuf::from)
        .or(venv.filter(|p| p.is_file()))
        .unwrap_or_else(|| "python3".into());
    let has = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    if !has(Command::new(&python).args(["-c", "import openai"])) || !has(Command::new("curl").arg("--version")) {
        eprintln!(
            "\n==> serve clients: SKIPPED tests/serve/openai_client.py (needs curl and a Python with `openai`: \
             python3 -m venv ~/.cache/needle/serve-venv && ~/.cache/needle/serve-venv/bin/pip install openai)"
        );
        return Ok(());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let needle = target.join("debug").join("needle");
    eprintln!("\n==> serve clients: {} tests/serve/openai_client.py", python.display());
    let status = Command::new(&python)
        .arg(root.join("tests/serve/openai_client.py"))
        .arg("--needle")
        .arg(&needle)
        .current_dir(root)
        .status()
        .context("running tests/serve/openai_client.py")?;
    if !status.success() {
        bail!("tests/serve/openai_client.py failed");
    }
    Ok(())
}

/// The kernel crate's tests built for aarch64 and run under qemu-user: all of them on qemu's
/// default CPU (dotprod present, so both NEON ISAs are compared with the scalar reference), then
/// the dot tests on a Cortex-A53 (no dotprod: detection must fall back to plain NEON). Skipped,
/// saying why, when the Rust target, qemu or the cross linker is missing. The build goes to the
/// CI's target dir (`CARGO_TARGET_DIR`, inherited) under `aarch64-unknown-linux-gnu/`.
fn aarch64_tests(root: &Path) -> Result<()> {
    const TARGET: &str = "aarch64-unknown-linux-gnu";
    let mut missing = Vec::new();
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET));
    if !installed {
        missing.push(format!("rust target {TARGET} (rustup target add {TARGET})"));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in ["qemu-aarch64", "aarch64-linux-gnu-gcc"] {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            missing.push(format!(
                "`{tool}` on PATH (apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
            ));
        }
    }
    if !missing.is_empty() {
        eprintln!("\n==> aarch64: SKIPPED the NEON kernel tests under qemu; missing: {}", missing.join("; "));
        return Ok(());
    }
    let args = ["test", "-p", "needle-kernels-cpu", "-p", "needle-quant", "--target", TARGET, "--locked"];
    let base = [
        ("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc"),
        ("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", "qemu-aarch64 -L /usr/aarch64-linux-gnu"),
    ];
    cargo_env(&args, root, &base)?;
    let dot_only = ["test", "-p", "needle-kernels-cpu", "--target", TARGET, "--locked", "--test", "dot"];
    cargo_env(&dot_only, root, &[base[0], base[1], ("QEMU_CPU", "cortex-a53")])
}

/// `cargo xtask test-gpu --help`.
const TEST_GPU_HELP: &str = "\
cargo xtask test-gpu [--build-only [--out DIR]]

Without --build-only (on a machine with Rust and a CUDA GPU): kernels-cubecl's clippy with wgpu
and cuda, needle-model's clippy with each, the kernel tests and the model tests at real shapes
on CUDA.

--build-only: builds, with `cuda`, the kernel tests (`gpu`), the model tests at real shapes
(`gpu_shapes`), the benchmark (`gpu_bench`) and `needle`; strips them and packs them into
DIR/needle-gpu.tar.gz (gzip -9) beside DIR/run.sh. DIR defaults to $CARGO_TARGET_DIR/gpu-bundle.
Prints the bundle's size and fails if it is over 60 MiB (a device run carries at most 64 MiB).

A device run (a machine with the CUDA driver, sh, tar and timeout; no Rust, no network), from the
repository root:
    cargo xtask test-gpu --build-only --out gpu-bundle     # `gpu-bundle/` is git-ignored
    then carry the ignored path `gpu-bundle` and run:  sh gpu-bundle/run.sh
run.sh unpacks into a temporary folder, runs the three steps under time limits (under five
minutes in all) and writes the logs, gpu-bench.json and summary.txt to $OUT (default
gpu-bundle/out); it prints the summary and exits non-zero if a step failed or timed out.";

/// `kernels-cubecl`'s clippy, needle-model's clippy with `wgpu` and with `cuda`, and the kernel
/// tests on the `cuda` runtime. `--build-only [--out DIR]` builds a bundle instead (see
/// [`RUN_SH`]; the machine that runs it needs the CUDA driver, not Rust or a network).
fn test_gpu(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{TEST_GPU_HELP}");
        return Ok(());
    }
    let root = root();
    let kc = ["-p", "needle-kernels-cubecl", "--locked"];
    let cuda = [&kc[..], &["--no-default-features", "--features", "cuda"]].concat();
    if !args.iter().any(|a| a == "--build-only") {
        for features in [&kc[..], &cuda] {
            cargo(&[&["clippy", "--all-targets"][..], features, &["--", "-D", "warnings"]].concat(), &root)?;
        }
        for feature in ["wgpu", "cuda"] {
            let args = ["clippy", "-p", "needle-model", "--all-targets", "--locked", "--features", feature];
            cargo(&[&args[..], &["--", "-D", "warnings"]].concat(), &root)?;
        }
        cargo(&[&["test"][..], &cuda].concat(), &root)?;
        return cargo(&["test", "-p", "needle-model", "--locked", "--features", "cuda", "--test", "gpu_shapes"], &root);
    }
    let out = args.iter().position(|a| a == "--out").and_then(|i| args.get(i + 1));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let out = out.map_or_else(|| target.join("gpu-bundle"), PathBuf::from);
    // One cargo run, so the CUDA stack is built once for all four: the kernel tests, the model
    // tests at real shapes, the benchmark and the `needle` binary, all with `cuda`.
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo_bin)
        .args([
            "build",
            "--message-format=json",
            "--locked",
            "-p",
            "needle-kernels-cubecl",
            "-p",
            "needle-model",
            "-p",
            "needle-cli",
            "--no-default-features",
            "--features",
            "needle-kernels-cubecl/cuda,needle-model/cuda,needle-cli/cuda",
            "--test",
            "gpu",
            "--test",
            "gpu_shapes",
            "--example",
            "gpu_bench",
            "--bin",
            "needle",
        ])
        .current_dir(&root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build for the GPU bundle")?;
    if !built.status.success() {
        bail!("building the CUDA bundle failed");
    }
    // An old bundle is replaced; any other folder is left alone.
    if out.exists() {
        let empty = std::fs::read_dir(&out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty && !out.join("run.sh").is_file() {
            bail!("--out {}: the folder exists and is not a bundle (no run.sh); not overwritten", out.display());
        }
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing the old bundle {}", out.display()))?;
    }
    // The executables are staged, stripped and packed into one gzip'd tar beside `run.sh`: the
    // bundle travels to a machine with a limit on what it carries, and every machine's tar
    // reads gzip (xz and zstd pack smaller but may be missing there).
    let stage = out.join("stage");
    std::fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
    let mut exes = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&built.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str()) else { continue };
        if !BUNDLED.contains(&name) {
            continue;
        }
        let to = stage.join(name);
        std::fs::copy(exe, &to).with_context(|| format!("copying {exe}"))?;
        if Command::new("strip").arg(&to).status().map(|s| !s.success()).unwrap_or(true) {
            eprintln!("test-gpu: `strip` failed or is missing; {name} is left with its symbols");
        }
        exes.insert(name.to_string(), to);
    }
    for name in BUNDLED {
        if !exes.contains_key(name) {
            bail!("the build made no `{name}` executable");
        }
    }
    let unpacked: u64 = exes.values().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    pack(&stage, &BUNDLED, &out.join(ARCHIVE))?;
    std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    let run = out.join("run.sh");
    std::fs::write(&run, RUN_SH).with_context(|| format!("writing {}", run.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?;
    }
    let carried = dir_bytes(&out)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "test-gpu: bundle in {}: {:.1} MiB as carried ({ARCHIVE} + run.sh; {:.1} MiB of stripped executables \
         unpacked), limit {BUNDLE_LIMIT_MIB} MiB",
        out.display(),
        mib(carried),
        mib(unpacked)
    );
    if carried > BUNDLE_LIMIT_MIB * 1024 * 1024 {
        bail!(
            "the GPU bundle is {:.1} MiB, over the {BUNDLE_LIMIT_MIB} MiB a device run carries: drop an executable \
             from BUNDLED or make them smaller",
            mib(carried)
        );
    }
    eprintln!("test-gpu: on the GPU machine run `sh {}/run.sh` (figures and logs go to $OUT)", out.display());
    Ok(())
}

/// The executables of the bundle (cargo's target names).
const BUNDLED: [&str; 4] = ["gpu", "gpu_shapes", "gpu_bench", "needle"];

/// The packed executables, beside `run.sh`.
const ARCHIVE: &str = "needle-gpu.tar.gz";

/// The most a bundle may weigh as carried (a device run carries 64 MiB of ignored paths in all).
const BUNDLE_LIMIT_MIB: u64 = 60;

/// `files` of `dir` packed into the gzip'd tar `to` (`gzip -9`: a quarter of the stripped size).
fn pack(dir: &Path, files: &[&str], to: &Path) -> Result<()> {
    let archive = std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let mut tar = Command::new("tar")
        .arg("-cf")
        .arg("-")
        .arg("-C")
        .arg(dir)
        .args(files)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running tar (needed to pack the GPU bundle)")?;
    let tar_out = tar.stdout.take().context("tar's output")?;
    let gzip = Command::new("gzip")
        .arg("-9")
        .arg("-c")
        .stdin(tar_out)
        .stdout(archive)
        .status()
        .context("running gzip (needed to pack the GPU bundle)")?;
    let tar = tar.wait().context("waiting for tar")?;
    if !tar.success() || !gzip.success() {
        bail!("packing {} failed (tar: {tar}, gzip: {gzip})", to.display());
    }
    Ok(())
}

/// The bytes of the files directly in `dir`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

/// The bundle's script: unpacks the executables into a temporary folder, runs each step under a
/// time limit (the whole under five minutes), writes the logs, the benchmark's JSON and a summary
/// under `$OUT` (default `./out` beside the script), and exits non-zero if a step failed.
const RUN_SH: &str = r#"#!/bin/sh
# needle's GPU bundle (cargo xtask test-gpu --build-only), for a CUDA machine with no Rust and no
# network: the CubeCL kernel tests, the model tests at real shapes (Llama-3-8B, Qwen2.5-7B,
# Gemma 3; two layers each) against the CPU path, then the benchmark (8B shape, 4 layers:
# prefill/decode tokens/s against context for full attention and retrieval, decode-attention
# kernel bandwidth). Needs sh, tar with gzip, timeout. Six files go to $OUT (default ./out beside
# this script): nvidia-smi.txt, a log per step, gpu-bench.json, summary.txt. Under five minutes.
here=$(cd "$(dirname "$0")" && pwd)
OUT="${OUT:-$here/out}"
mkdir -p "$OUT"
work=$(mktemp -d "${TMPDIR:-/tmp}/needle-gpu.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
if ! tar -xzf "$here/needle-gpu.tar.gz" -C "$work"; then
    echo "run.sh: unpacking $here/needle-gpu.tar.gz failed"
    exit 2
fi
cd "$work" || exit 2
fail=0
: > "$OUT/summary.txt"
step() {
    name=$1; limit=$2; shift 2
    echo "==> $name (limit ${limit}s): $*"
    t0=$(date +%s)
    ( timeout "$limit" "$@"; echo $? > "$work/$name.rc" ) 2>&1 | tee "$OUT/$name.log"
    rc=$(cat "$work/$name.rc")
    secs=$(( $(date +%s) - t0 ))
    case $rc in
        0) what="ok" ;;
        124) what="TIMED OUT after ${limit}s"; fail=1 ;;
        *) what="FAILED (exit $rc)"; fail=1 ;;
    esac
    echo "$name: $what, ${secs}s" >> "$OUT/summary.txt"
    echo "==> $name: $what, ${secs}s"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
step kernels 60 ./gpu --test-threads 4
export NEEDLE_PRINT_ERR=1
step model-shapes 110 ./gpu_shapes --nocapture
step bench 110 ./gpu_bench --shape llama3-8b --layers 4 --quant q4_0 --contexts 4096,32768,16384 \
    --decode 16 --budget-s 80 --json "$OUT/gpu-bench.json"
echo "==> summary ($OUT)"
cat "$OUT/summary.txt"
exit $fail
"#;

/// The build's target folder (`CARGO_TARGET_DIR`, else `target/` in the workspace).
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("\n==> {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// The virtual environment of the Python tests (`~/.cache/needle/pyenv`, made with `python3 -m
/// venv` if absent) with `packages` installed; returns its interpreter.
fn python_env(packages: &[&str]) -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let venv = PathBuf::from(home).join(".cache/needle/pyenv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("making the Python tests' venv (needs python3 with the venv module)")?;
    }
    run_cmd(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(packages),
    )?;
    Ok(python)
}

/// The Python package's tests on the extension module the workspace build already made
/// (`lib_needle.so` of the dev profile, features as CI's `cargo test` unified them: nothing is
/// compiled again), laid out as the package beside its Python files and put on `PYTHONPATH`.
/// `needle` and the `reference` example are the Rust sides the tests compare with.
fn python_tests(root: &Path, tests: &[&str], extra_packages: &[&str]) -> Result<()> {
    let python = python_env(&[&["numpy>=1.21", "pytest>=7"][..], extra_packages].concat())?;
    let target = target_dir(root);
    let debug = target.join("debug");
    let (needle, reference) = (debug.join("needle"), debug.join("examples/reference"));
    if [&needle, &reference].iter().any(|p| !p.is_file()) || newest_module(&debug).is_none() {
        cargo(&["build", "--locked", "-p", "needle-python", "--lib", "--example", "reference"], root)?;
        cargo(&["build", "--locked", "-p", "needle-cli"], root)?;
    }
    let module = newest_module(&debug).context("the build made no lib_needle.so")?;
    let site = target.join("python-dev");
    let pkg = site.join("needle");
    std::fs::create_dir_all(&pkg)?;
    for entry in std::fs::read_dir(root.join("python/needle"))? {
        let p = entry?.path();
        if let (true, Some(name)) = (p.is_file(), p.file_name()) {
            std::fs::copy(&p, pkg.join(name))?;
        }
    }
    // Replaced by rename, not written over: a Python that has the old one loaded keeps it.
    let staged = pkg.join("_needle.abi3.so.new");
    std::fs::copy(&module, &staged)?;
    std::fs::rename(&staged, pkg.join("_needle.abi3.so"))?;
    run_cmd(
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .args(tests)
            .env("PYTHONPATH", &site)
            .env("NEEDLE_BIN", &needle)
            .env("NEEDLE_REFERENCE_BIN", &reference)
            .current_dir(root),
    )
}

/// The extension module the last build made: `cargo build` copies it to `debug/`, `cargo test`
/// leaves it in `debug/deps/` (a cdylib's name there has no hash).
fn newest_module(debug: &Path) -> Option<PathBuf> {
    [debug.join("lib_needle.so"), debug.join("deps/lib_needle.so")]
        .into_iter()
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

/// The Ray Serve example on a local Ray cluster its test starts (two replicas).
fn ray() -> Result<()> {
    let root = root();
    fetch_model()?;
    cargo(&["build", "--locked", "-p", "needle-python", "--lib", "--example", "reference"], &root)?;
    cargo(&["build", "--locked", "-p", "needle-cli"], &root)?;
    python_tests(&root, &["examples/ray-serve"], &[RAY])
}

/// What the Ray Serve example's test installs.
const RAY: &str = "ray[serve]>=2.9";
