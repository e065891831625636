//! The Python module `genlm_anyio._core`.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

mod buffers;
mod trie;
mod vocab;

/// Run the body of a Python entry point, turning a Rust panic into a
/// `ValueError` naming `entry`.
///
/// pyo3 would raise a panic as `PanicException`, a `BaseException` that
/// `except Exception` does not catch; no input may end a caller's program that
/// way. Every entry point's body goes through here. Asserting unwind safety is
/// sound because the bodies only build fresh values (or read immutable ones):
/// nothing a panic interrupts is visible to Python afterwards.
pub(crate) fn no_panic<T>(entry: &str, body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        Err(PyValueError::new_err(format!("{entry}: internal error: {}", panic_message(&*payload))))
    })
}

/// The message a panic was raised with.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

#[pymodule]
fn _core(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    vocab::register(m)?;
    trie::register(m)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_value_error_naming_the_entry_point() {
        pyo3::prepare_freethreaded_python();
        Python::with_gil(|py| {
            let err = no_panic("entry", || -> PyResult<()> { panic!("boom {}", 7) }).unwrap_err();
            assert!(err.is_instance_of::<PyValueError>(py));
            assert_eq!(err.value(py).to_string(), "entry: internal error: boom 7");
            let err = no_panic("entry", || -> PyResult<()> { std::panic::panic_any(3) }).unwrap_err();
            assert!(err.value(py).to_string().ends_with("a panic without a message"));
            assert_eq!(no_panic("entry", || Ok(5)).unwrap(), 5);
        });
    }
}
