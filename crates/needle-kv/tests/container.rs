//! The context file container: round trips, and every kind of damage as a named error.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use needle_kv::{ContextReader, ContextWriter, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A file of three sections, one paged with a short last page, one empty.
fn write_sample(path: &Path, seed: u8, overwrite: bool) {
    let mut w = ContextWriter::create(path, overwrite).unwrap();
    w.section("meta", format!("{{\"seed\":{seed}}}").as_bytes()).unwrap();
    let body: Vec<u8> = (0..1000u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    w.paged_section("pages", 256, body.chunks(256)).unwrap();
    w.section("empty", &[]).unwrap();
    w.finish().unwrap();
}

fn check_sample(path: &Path, seed: u8) {
    let r = ContextReader::open(path).unwrap();
    assert_eq!(r.section("meta").unwrap(), format!("{{\"seed\":{seed}}}").as_bytes());
    let body: Vec<u8> = (0..1000u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    assert_eq!(r.section("pages").unwrap(), &body[..]);
    assert!(r.section("empty").unwrap().is_empty());
    assert!(matches!(r.section("nope"), Err(Error::Missing { .. })));
}

#[test]
fn sections_round_trip_and_files_are_never_silently_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.needle");
    write_sample(&path, 3, false);
    check_sample(&path, 3);
    assert!(matches!(ContextWriter::create(&path, false), Err(Error::Exists { .. })));
    write_sample(&path, 5, true);
    check_sample(&path, 5);
    // An unfinished writer leaves neither a temporary file nor a changed destination.
    let mut w = ContextWriter::create(&path, true).unwrap();
    w.section("meta", b"half written").unwrap();
    drop(w);
    check_sample(&path, 5);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    let mut w = ContextWriter::create(&dir.path().join("b"), false).unwrap();
    w.section("x", b"1").unwrap();
    assert!(matches!(w.section("x", b"2"), Err(Error::BadSection { .. })));
    assert!(matches!(w.paged_section("y", 4, [&b"12"[..], &b"34"[..]]), Err(Error::BadSection { .. })));
}

#[test]
fn every_truncation_and_bit_flip_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.needle");
    write_sample(&path, 7, false);
    let good = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.needle");
    let read_all = |p: &Path| -> Result<(), Error> {
        let r = ContextReader::open(p)?;
        for s in ["meta", "pages", "empty"] {
            r.section(s)?;
        }
        Ok(())
    };
    for len in 0..good.len() {
        std::fs::write(&bad, &good[..len]).unwrap();
        let e = read_all(&bad).unwrap_err();
        assert!(
            matches!(e, Error::Truncated { .. } | Error::NotAContext { .. } | Error::Corrupt { .. }),
            "cut at {len}: {e}"
        );
    }
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..2000 {
        let mut b = good.clone();
        let i = rng.random_range(0..b.len());
        b[i] ^= 1 << rng.random_range(0..8);
        std::fs::write(&bad, &b).unwrap();
        // Padding between sections is not covered by a checksum: a flip there changes nothing read.
        if let Ok(()) = read_all(&bad) {
            let r = ContextReader::open(&bad).unwrap();
            assert_eq!(r.section("pages").unwrap(), ContextReader::open(&path).unwrap().section("pages").unwrap());
            continue;
        }
        let e = read_all(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.needle"), "errors name the file: {e}");
    }
    let mut b = good.clone();
    b[8] = 9;
    std::fs::write(&bad, &b).unwrap();
    assert!(matches!(ContextReader::open(&bad), Err(Error::Version { found: 9, .. })));
    std::fs::write(&bad, b"GGUF and more bytes than a header needs, surely").unwrap();
    assert!(matches!(ContextReader::open(&bad), Err(Error::NotAContext { .. })));
}

const CHILD: &str = "NEEDLE_KV_SAVE_CHILD";

/// Saves ever-new large files over one path until killed (run as a child process). Nothing here
/// depends on where a kill lands: whenever it lands — before the child starts, mid-save, between
/// two saves — the file at the path must be one complete save; a save that wrote the path in
/// place would leave a cut file for most kill times, as saves take almost all of a child's time.
#[test]
fn killed_saves_leave_a_complete_file() {
    if let Ok(path) = std::env::var(CHILD) {
        let path = Path::new(&path);
        for round in 0u32.. {
            let tag = (round % 250) as u8 + 1;
            let mut w = ContextWriter::create(path, true).unwrap();
            w.section("tag", &[tag]).unwrap();
            let page = vec![tag; 1 << 16];
            w.paged_section("body", page.len(), std::iter::repeat_n(&page[..], 64)).unwrap();
            w.finish().unwrap();
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctx.needle");
    let mut w = ContextWriter::create(&path, false).unwrap();
    w.section("tag", &[0]).unwrap();
    w.paged_section("body", 4, [&[0u8; 4][..]]).unwrap();
    w.finish().unwrap();
    let names = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let mut rng = StdRng::seed_from_u64(5);
    let (mut tags, mut children) = (Vec::new(), Vec::new());
    for _ in 0..12 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "killed_saves_leave_a_complete_file", "--nocapture"])
            .env(CHILD, &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Aim the kill at a save in progress (the child's temporary file exists), which is what
        // can catch a save that is not atomic; on a loaded machine the child may not get there
        // in time, and the check below holds all the same.
        let own = format!(".ctx.needle.{}.tmp", child.id());
        children.push(own.clone());
        let started = std::time::Instant::now();
        while !names().contains(&own) && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(5..120)));
        child.kill().unwrap();
        child.wait().unwrap();
        let r = ContextReader::open(&path).unwrap();
        let tag = r.section("tag").unwrap()[0];
        let body = r.section("body").unwrap();
        assert!(body.iter().all(|&b| b == tag), "a complete save of tag {tag}");
        tags.push(tag);
    }
    eprintln!("the kills left the saves tagged {tags:?} (0: the first file, before any child saved)");

    // A killed save leaves its temporary file (or not, if the kill fell between two saves): the
    // next save removes those of processes that are gone, and only those. Planted, so the check
    // does not depend on where the kills landed: a pid no process can have (Linux pids are at
    // most 2^22), and pid 1, which is always alive.
    if !Path::new("/proc/self").exists() {
        return; // liveness is read from /proc; elsewhere temporaries are left alone
    }
    let left = names();
    let (gone, alive) = (".ctx.needle.4000000000.tmp", ".ctx.needle.1.tmp");
    for name in [gone, alive] {
        std::fs::write(dir.path().join(name), b"an unfinished save").unwrap();
    }
    let mut w = ContextWriter::create(&path, true).unwrap();
    w.section("tag", &[1]).unwrap();
    w.finish().unwrap();
    // A killed child's pid taken since by a new process makes its temporary a live one's.
    let reused = |name: &String| {
        let pid = name.trim_start_matches(".ctx.needle.").trim_end_matches(".tmp");
        Path::new("/proc").join(pid).exists()
    };
    let mut want: Vec<String> = left
        .into_iter()
        .filter(|n| children.contains(n) && reused(n))
        .chain([alive.into(), "ctx.needle".into()])
        .collect();
    want.sort();
    assert_eq!(names(), want, "the saved file, and the temporaries of live processes");
}

/// Readers of one file open at once share its map (a section is at the same address); a file
/// replaced by a new save is mapped afresh (its new contents, never the old map's).
#[test]
fn open_readers_of_one_file_share_its_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.needle");
    write_sample(&path, 3, false);
    let (a, b) = (ContextReader::open(&path).unwrap(), ContextReader::open(&path).unwrap());
    let at = |r: &ContextReader| r.section("pages").unwrap().as_ptr();
    if cfg!(unix) {
        assert_eq!(at(&a), at(&b), "two readers of one file map it once");
    }
    write_sample(&path, 5, true);
    let c = ContextReader::open(&path).unwrap();
    assert_ne!(at(&a), at(&c), "a replaced file is mapped again");
    check_sample(&path, 5);
    assert_eq!(a.section("meta").unwrap(), b"{\"seed\":3}", "an open reader keeps the file it opened");
    drop((a, b, c));
    check_sample(&path, 5);
}
