//! needle-core's paged rows over this crate's disk tier: pages spilled to a `SpillFile` read back
//! what they held, at every stored precision, and a full disk tier is a named error.
#![allow(clippy::unwrap_used)]

use needle_core::{Error, KvDtype, PagedRows, RowSource};
use needle_kv::SpillFile;

fn row(i: usize) -> Vec<f32> {
    (0..5).map(|j| ((i * 5 + j) as f32 * 0.37).sin()).collect()
}

#[test]
fn paged_rows_spilled_to_a_file_read_as_before() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8] {
        let mut p = PagedRows::with_dtype(5, 4, dtype).unwrap();
        (0..11).for_each(|i| assert_eq!(p.push(&row(i)).unwrap(), i as u32));
        let before: Vec<Vec<f32>> = (0..11).map(|i| p.row(i).to_vec()).collect();
        let mut spill = SpillFile::create(dir.path(), None).unwrap();
        let moved: Vec<bool> = [0, 1, 2, 0].iter().map(|&i| p.spill_page(i, &mut spill).unwrap()).collect();
        assert_eq!(moved, [true, true, false, false], "{dtype}: the page being filled stays");
        assert_eq!(spill.bytes(), 2 * p.page_bytes() as u64);
        assert_eq!((p.host_bytes(), p.bytes()), (p.page_bytes(), 3 * p.page_bytes()));
        assert!(!p.pages().is_host(0) && !p.pages().is_host(1));
        assert!((0..11).all(|i| p.row(i).to_vec() == before[i]), "{dtype}");
        spill.release();
        assert!((0..11).all(|i| p.row(i).to_vec() == before[i]), "{dtype}: read again after a release");
        p.truncate(6);
        p.push(&row(99)).unwrap();
        assert!(p.pages().is_host(1), "a spilled page written again comes back into RAM");
        assert!((0..6).all(|i| p.row(i).to_vec() == before[i]));
    }
}

#[test]
fn a_full_disk_tier_is_a_storage_error_and_the_page_stays_in_ram() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = PagedRows::new(5, 4).unwrap();
    for i in 0..12 {
        p.push(&row(i)).unwrap();
    }
    let mut spill = SpillFile::create(dir.path(), Some(p.page_bytes() as u64)).unwrap();
    assert!(p.spill_page(0, &mut spill).unwrap());
    let err = p.spill_page(1, &mut spill).unwrap_err();
    assert!(matches!(&err, Error::Storage(m) if m.contains("disk")), "{err}");
    assert!(p.pages().is_host(1));
    assert_eq!(p.row(5).to_vec(), row(5));
}
