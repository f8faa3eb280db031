//! `needle` for Python: the extension module `needle._needle` (PyO3, abi3).
//!
//! Two halves, one job each:
//! - [`model`]: a model, generation as an iterator of text pieces, prefilled contexts that are
//!   saved, loaded and asked, driven through needle-cli's own steps (`needle_cli::common`) so
//!   that a prompt becomes the same tokens, and the same answer, as in `needle generate`.
//! - [`arrays`]: vector indexes and attention selectors on numpy arrays, read in place (a
//!   C-contiguous `float32` array is borrowed, never copied) with the GIL released while they
//!   compute.
//!
//! Every needle error becomes a `needle.NeedleError` carrying needle's message (its whole
//! chain of causes).

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

mod arrays;
mod model;

create_exception!(
    needle,
    NeedleError,
    PyException,
    "An error from needle: a bad argument, file, spec or model, with needle's message."
);

/// A needle error (any `Display`, an `anyhow` chain shown whole) as a `NeedleError`.
pub(crate) fn err(e: impl Into<anyhow::Error>) -> PyErr {
    NeedleError::new_err(format!("{:#}", e.into()))
}

/// A `serde_json` value as the Python object `json.loads` makes of it (stats as a dict).
pub(crate) fn to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(v).map_err(err)?;
    py.import("json")?.call_method1("loads", (text,))
}

#[pymodule]
fn _needle(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NeedleError", m.py().get_type::<NeedleError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    arrays::register(m)?;
    model::register(m)?;
    Ok(())
}
