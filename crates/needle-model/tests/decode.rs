//! The decode fast path against the f64 reference, on fresh random input.

use needle_core::{KvDtype, PagedRows, Selection, StaticPart, attend_selected};
use needle_model::decode::{GroupScratch, attend_group};
use proptest::prelude::*;

proptest! {
    #[test]
    fn attend_group_equals_reference(
        n in 1usize..300,
        g in 1usize..4,
        sinks in 0usize..8,
        window in 0usize..64,
        seed in any::<u64>(),
        weighted in any::<bool>(),
        precision in 0usize..3,
    ) {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let d = 16;
        let mut rng = StdRng::seed_from_u64(seed);
        // f16 pages are read as f16 by the kernel and q8 rows widened first; the reference
        // widens the same stored rows exactly.
        let kv = [KvDtype::F32, KvDtype::F16, KvDtype::Q8][precision];
        let mut keys = PagedRows::with_dtype(d, 32, kv).unwrap();
        let mut values = PagedRows::with_dtype(d, 32, kv).unwrap();
        for _ in 0..n {
            let k: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
            let v: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
            keys.push(&k).unwrap();
            values.push(&v).unwrap();
        }
        let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let sp = StaticPart { sinks, window };
        let dynamic = sp.dynamic_range(n);
        let ids: Vec<u32> = dynamic.clone().filter(|_| rng.random_bool(0.3)).collect();
        let log_weights = if weighted { ids.iter().map(|_| rng.random_range(-1.0..1.0)).collect() } else { Vec::new() };
        let sel = Selection { ids, log_weights, ..Default::default() };
        let mut scratch = GroupScratch::default();
        let out = attend_group(&q, &keys, &values, sp, &sel, 0.25, &mut scratch).unwrap();
        for h in 0..g {
            let want = attend_selected::<f64>(&q[h * d..(h + 1) * d], &keys, &values, sp, &sel, 0.25).unwrap();
            for (a, b) in out[h * d..(h + 1) * d].iter().zip(&want.out) {
                prop_assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }
}

#[test]
fn selection_outside_the_dynamic_part_is_rejected() {
    let mut keys = PagedRows::new(2, 4).unwrap();
    for i in 0..10 {
        keys.push(&[i as f32, 1.0]).unwrap();
    }
    let sp = StaticPart { sinks: 2, window: 4 };
    let sel = Selection { ids: vec![8], ..Default::default() };
    let mut s = GroupScratch::default();
    assert!(attend_group(&[1.0, 0.0], &keys, &keys, sp, &sel, 1.0, &mut s).is_err());
    assert!(attend_group(&[f32::NAN, 0.0], &keys, &keys, sp, &Selection::default(), 1.0, &mut s).is_err());
}

#[test]
fn keys_and_values_of_different_precisions_are_an_error() {
    let mut keys = PagedRows::with_dtype(2, 4, KvDtype::F16).unwrap();
    let mut values = PagedRows::new(2, 4).unwrap();
    keys.push(&[1.0, 2.0]).unwrap();
    values.push(&[1.0, 2.0]).unwrap();
    let sp = StaticPart { sinks: 1, window: 0 };
    let mut scratch = GroupScratch::default();
    let err = attend_group(&[0.5, 0.5], &keys, &values, sp, &Selection::default(), 1.0, &mut scratch);
    assert!(err.unwrap_err().to_string().contains("f16"));
}
