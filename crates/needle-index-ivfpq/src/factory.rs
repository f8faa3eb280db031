//! Index-factory strings, faiss style: one pattern per comma-separated component.

use needle_core::{Error, Result, VectorIndex};

use crate::ivfpq::{IvfPqIndex, IvfPqParams};

const VALID: &str = "valid forms: \"IVF<nlist>,PQ<m>\", \"IVF<nlist>,PQ<m>x<nbits>\", \"PQ<m>\", \"PQ<m>x<nbits>\" \
     (nlist may end in k or M), e.g. \"IVF256,PQ16\", \"IVF1024,PQ32x8\", \"PQ16\"";

fn bad(spec: &str, why: &str) -> Error {
    Error::invalid("spec", format!("`{spec}`: {why}; {VALID}"))
}

/// A positive decimal with an optional `k` (×1024) or `M` (×1024²) suffix, as faiss reads nlist.
fn number(s: &str, suffixes: bool) -> Option<usize> {
    let (digits, mul) = match s.strip_suffix('k') {
        Some(d) if suffixes => (d, 1024),
        _ => match s.strip_suffix('M') {
            Some(d) if suffixes => (d, 1024 * 1024),
            _ => (s, 1),
        },
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<usize>().ok()?.checked_mul(mul).filter(|&v| v > 0)
}

/// Parses `"IVF256,PQ16"`, `"IVF1024,PQ32x8"` or `"PQ16"` into parameters (others at defaults).
pub fn parse(spec: &str) -> Result<IvfPqParams> {
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let (ivf, pq) = match parts.as_slice() {
        [pq] => (None, *pq),
        [ivf, pq] => (Some(*ivf), *pq),
        _ => return Err(bad(spec, "expected one or two components")),
    };
    let nlist = match ivf {
        None => 1,
        Some(c) => {
            let n = c.strip_prefix("IVF").ok_or_else(|| bad(spec, &format!("unknown component `{c}`")))?;
            number(n, true).ok_or_else(|| bad(spec, &format!("bad list count in `{c}`")))?
        }
    };
    let body = pq.strip_prefix("PQ").ok_or_else(|| bad(spec, &format!("unknown component `{pq}`")))?;
    let (m, nbits) = match body.split_once('x') {
        None => (number(body, false), Some(8)),
        Some((m, b)) => (number(m, false), number(b, false)),
    };
    let (m, nbits) = match (m, nbits) {
        (Some(m), Some(b)) => (m, b),
        _ => return Err(bad(spec, &format!("bad PQ component `{pq}`"))),
    };
    Ok(IvfPqParams { nlist, m, nbits, ..IvfPqParams::default() })
}

/// An empty IVF-PQ index for `dim`-float vectors from a factory string.
pub fn from_factory(dim: usize, spec: &str) -> Result<Box<dyn VectorIndex>> {
    Ok(Box::new(IvfPqIndex::from_factory(dim, spec)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_forms_and_round_trips_describe() {
        for (spec, nlist, m, nbits) in [
            ("IVF256,PQ16", 256, 16, 8),
            ("IVF1024,PQ32x8", 1024, 32, 8),
            ("PQ16", 1, 16, 8),
            ("IVF4k,PQ8x4", 4096, 8, 4),
        ] {
            let p = parse(spec).unwrap();
            assert_eq!((p.nlist, p.m, p.nbits), (nlist, m, nbits), "{spec}");
            let idx = from_factory(64, spec).unwrap();
            assert_eq!(parse(&idx.describe()).unwrap(), p);
        }
        assert_eq!(from_factory(64, "IVF1024,PQ32x8").unwrap().describe(), "IVF1024,PQ32");
        assert_eq!(from_factory(64, " IVF8 , PQ4x6 ").unwrap().describe(), "IVF8,PQ4x6");
    }

    #[test]
    fn bad_strings_list_the_valid_forms() {
        for spec in [
            "",
            "IVF",
            "IVF0,PQ16",
            "IVF256",
            "IVF256,PQ",
            "HNSW32",
            "IVF256,PQ16,Flat",
            "PQ16x",
            "PQx8",
            "IVF-3,PQ8",
            "PQ8k",
        ] {
            match parse(spec) {
                Err(Error::InvalidParameter { name, reason }) => {
                    assert_eq!(name, "spec");
                    assert!(reason.contains("IVF1024,PQ32x8"), "{reason}");
                }
                other => panic!("{spec:?} gave {other:?}"),
            }
        }
        // Well-formed but invalid for the dimension.
        assert!(matches!(from_factory(60, "IVF16,PQ16"), Err(Error::InvalidParameter { name, .. }) if name == "m"));
        assert!(matches!(from_factory(64, "PQ16x9"), Err(Error::InvalidParameter { name, .. }) if name == "nbits"));
    }
}
