//! Array exchange with numpy by address.
//!
//! pyo3's buffer-protocol support needs the limited API of Python 3.11, and the
//! extension targets abi3-py38, so arrays travel as `(address, length)`: the
//! Python wrappers in `genlm_anyio` allocate or validate every array (dtype,
//! C-contiguity, shape, writability), hold it for the duration of the call and
//! pass `arr.__array_interface__["data"][0]`. These private entry points trust
//! that contract; nothing else should call them.

use pyo3::exceptions::PyValueError;
use pyo3::PyResult;

fn check<T>(addr: usize, name: &str) -> PyResult<()> {
    if addr == 0 || !addr.is_multiple_of(std::mem::align_of::<T>()) {
        return Err(PyValueError::new_err(format!("{name}: invalid array address")));
    }
    Ok(())
}

/// The `len` elements at `addr`.
///
/// # Safety
/// `addr` must point to `len` initialized `T`s that stay alive and unmodified
/// for `'a` (the Python wrapper holds the array during the call).
pub unsafe fn slice<'a, T>(addr: usize, len: usize, name: &str) -> PyResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    check::<T>(addr, name)?;
    Ok(std::slice::from_raw_parts(addr as *const T, len))
}

/// The `len` elements at `addr`, writable.
///
/// # Safety
/// As for [`slice`], and the memory must be writable and not aliased by any
/// other slice for `'a` (the wrappers allocate outputs freshly).
pub unsafe fn slice_mut<'a, T>(addr: usize, len: usize, name: &str) -> PyResult<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check::<T>(addr, name)?;
    Ok(std::slice::from_raw_parts_mut(addr as *mut T, len))
}
