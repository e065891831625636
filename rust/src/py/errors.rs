//! How every failure of the core reaches Python: one conversion per core error
//! type, and one wrapper, [`entry_point`], around the body of every function and
//! method that Python calls.
//!
//! - Bad input is a `ValueError` (or a `TypeError` for a wrong type, raised
//!   where the argument is checked), naming the argument.
//! - A file that cannot be read is an `OSError`, built from the OS error code
//!   so that Python picks its subclass (`FileNotFoundError`,
//!   `PermissionError`...), with the path as its `filename`.
//! - A Rust panic is a `ValueError` naming the entry point. pyo3 would raise it
//!   as `PanicException`, a `BaseException` that `except Exception` does not
//!   catch; no input may end a caller's program that way.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::PyErr;
use pyo3::PyResult;

use crate::trie::TrieError;
use crate::vocab::VocabError;

/// Run the body of the Python entry point `entry` (`"TrieCore.reduce"`),
/// turning a panic into a `ValueError` that names it.
///
/// Asserting unwind safety is sound because the bodies build fresh values,
/// read immutable ones or write only into the call's own output array: what a
/// panic interrupts is either dropped or an output that the error tells the
/// caller not to use.
pub(crate) fn entry_point<T>(entry: &str, body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
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

impl From<TrieError> for PyErr {
    fn from(e: TrieError) -> PyErr {
        PyValueError::new_err(e.to_string())
    }
}

impl From<VocabError> for PyErr {
    fn from(e: VocabError) -> PyErr {
        match e {
            // OSError(errno, strerror, filename) is an instance of the errno's subclass.
            VocabError::Io { path, errno: Some(errno), message } => PyOSError::new_err((errno, message, path)),
            VocabError::Io { .. } => PyOSError::new_err(e.to_string()),
            VocabError::Format(_) | VocabError::Unsupported(_) | VocabError::Undecodable(_) => {
                PyValueError::new_err(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::Python;

    #[test]
    fn a_panic_becomes_a_value_error_naming_the_entry_point() {
        pyo3::prepare_freethreaded_python();
        Python::with_gil(|py| {
            let err = entry_point("entry", || -> PyResult<()> { panic!("boom {}", 7) }).unwrap_err();
            assert!(err.is_instance_of::<PyValueError>(py));
            assert_eq!(err.value(py).to_string(), "entry: internal error: boom 7");
            let err = entry_point("entry", || -> PyResult<()> { std::panic::panic_any(3) }).unwrap_err();
            assert!(err.value(py).to_string().ends_with("a panic without a message"));
            assert_eq!(entry_point("entry", || Ok(5)).unwrap(), 5);
        });
    }

    /// The entry points of a bindings file `source`: `(name, the first line of
    /// its body)` of each `#[pyfunction]` and of each method of a `#[pymethods]` block.
    fn entry_points(source: &str) -> Vec<(String, String)> {
        let lines: Vec<&str> = source.lines().collect();
        let (mut found, mut in_methods, mut next_fn_is_entry) = (Vec::new(), false, false);
        for (i, line) in lines.iter().enumerate() {
            match *line {
                "#[pymethods]" => in_methods = true,
                "#[pyfunction]" => next_fn_is_entry = true,
                "}" => in_methods = false,
                _ => {}
            }
            let method = in_methods && line.starts_with("    fn ");
            if !(method || (next_fn_is_entry && line.starts_with("fn "))) {
                continue;
            }
            next_fn_is_entry = false;
            let name = line.trim_start().trim_start_matches("fn ").split(['(', '<']).next().unwrap().to_owned();
            let open = (i..lines.len()).find(|&j| lines[j].ends_with('{')).unwrap();
            found.push((name, lines[open + 1].trim().to_owned()));
        }
        found
    }

    #[test]
    fn every_entry_point_runs_through_entry_point() {
        let trie = entry_points(include_str!("trie.rs"));
        let vocab = entry_points(include_str!("vocab.rs"));
        assert!(trie.len() >= 20 && vocab.len() == 3, "{trie:?} {vocab:?}");
        for (name, body) in trie.iter().chain(&vocab) {
            let entry = match name.as_str() {
                "new" => "TrieCore".to_owned(),
                "copy_into" => name.clone(),
                _ if vocab.iter().any(|(v, _)| v == name) => name.clone(),
                _ => format!("TrieCore.{name}"),
            };
            assert!(body.starts_with(&format!("entry_point(\"{entry}\"")), "{name} starts with {body:?}");
        }
    }

    #[test]
    fn core_errors_become_the_python_exception_of_their_kind() {
        pyo3::prepare_freethreaded_python();
        Python::with_gil(|py| {
            let text = |e: &PyErr| e.value(py).to_string();
            // The class Python raises: OSError(errno, ...) makes the errno's subclass.
            let raised = |e: &PyErr| e.value(py).get_type().name().unwrap().to_owned();
            let nan: PyErr = TrieError::NanWeight { row: Some(1), index: 4 }.into();
            assert_eq!(raised(&nan), "ValueError");
            assert_eq!(text(&nan), "weights contain NaN (row 1, token 4)");
            let missing: PyErr =
                VocabError::Io { path: "/x.gguf".into(), errno: Some(2), message: "No such file".into() }.into();
            assert_eq!(raised(&missing), "FileNotFoundError");
            assert_eq!(text(&missing), "[Errno 2] No such file: '/x.gguf'");
            assert_eq!(missing.value(py).getattr("filename").unwrap().extract::<String>().unwrap(), "/x.gguf");
            let denied: PyErr = VocabError::Io { path: "/y".into(), errno: Some(13), message: "denied".into() }.into();
            assert_eq!(raised(&denied), "PermissionError");
            let no_code: PyErr = VocabError::Io { path: "s".into(), errno: None, message: "gone".into() }.into();
            assert_eq!(raised(&no_code), "OSError");
            assert_eq!(text(&no_code), "cannot read s: gone");
            let malformed: PyErr = VocabError::Format("bad magic".into()).into();
            assert_eq!(raised(&malformed), "ValueError");
            assert_eq!(text(&malformed), "malformed tokenizer: bad magic");
        });
    }
}
