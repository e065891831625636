//! Arrays from Python through the buffer protocol, checked in one place.
//!
//! Every array argument of `genlm_anyio._core` is a Python object exporting a
//! buffer (a numpy array, a `memoryview`, `array.array`, `bytes`...).
//! [`Buffer`] (read) and [`BufferMut`] (write) acquire it with
//! `PyObject_GetBuffer`, check it against what the entry point needs, and hold
//! it until they are dropped, when `PyBuffer_Release` gives it back. While a
//! buffer is held its exporter keeps the memory where it is (numpy refuses to
//! resize the array, `bytearray` to grow), so the slices stay valid even while
//! the GIL is released. The checks, each failing with an error that names the
//! argument:
//! - the element type: the buffer's format code and item size are those of the
//!   Rust type (`f32` is `'f'`, `f64` `'d'`, `i32` `'i'`, `i64` `'l'`/`'q'`,
//!   a bool mask `'?'`), in native byte order (TypeError otherwise);
//! - C-contiguous, aligned for the element type, and of the expected shape
//!   (ValueError otherwise);
//! - for outputs, writable and not overlapping any input of the call (ValueError);
//! - across calls: no buffer a call writes overlaps one that another call,
//!   running now on another thread, reads or writes, and no buffer a call reads
//!   overlaps one that another call writes (ValueError; see [`Claim`]).
//!
//! Why the declarations below instead of `pyo3::buffer`: the extension is built
//! against the stable ABI (abi3-py38), so one wheel serves every CPython from 3.8
//! on. The buffer functions joined the limited API only in 3.11, and pyo3 0.17
//! offers `pyo3::buffer` under abi3 only from 3.11 (which it does not support
//! as an abi3 floor anyway). The alternatives were one wheel per Python version
//! (no abi3), or passing raw addresses that the Python side had to check, which
//! is what this replaces. Instead, `Py_buffer` is declared here with the layout
//! CPython has used since 3.3 (the one 3.11 froze into the stable ABI), and
//! `PyObject_GetBuffer`/`PyBuffer_Release`, exported by every CPython since 3.0,
//! are declared as `extern "C"`. Only the buffer's exporter writes the struct;
//! it is boxed because exporters may point its `shape` into it.

use std::marker::PhantomData;
use std::ops::Range;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi::{PyObject, Py_ssize_t};
use pyo3::{AsPyPointer, PyAny, PyErr, PyResult, Python};

/// CPython's `Py_buffer` (Include/cpython/object.h from 3.3 on, Include/pybuffer.h
/// from 3.11, where it is part of the stable ABI).
#[repr(C)]
struct PyBufferView {
    buf: *mut c_void,
    obj: *mut PyObject,
    len: Py_ssize_t,
    itemsize: Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut Py_ssize_t,
    strides: *mut Py_ssize_t,
    suboffsets: *mut Py_ssize_t,
    internal: *mut c_void,
}

/// `PyBUF_STRIDES | PyBUF_FORMAT` (`PyBUF_RECORDS_RO`): shape, strides and format,
/// read-only or not. Contiguity and writability are checked here, so that the
/// error names the argument instead of coming from the exporter.
const PYBUF_RECORDS_RO: c_int = 0x0010 | 0x0008 | 0x0004;

extern "C" {
    fn PyObject_GetBuffer(obj: *mut PyObject, view: *mut PyBufferView, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut PyBufferView);
}

/// An element type a buffer can hold.
pub trait Element: Copy + Send + Sync + 'static {
    /// Its name in errors, as numpy calls it.
    const DTYPE: &'static str;
    /// Whether a buffer format code of `size_of::<Self>()`-byte items holds it.
    fn accepts(code: u8) -> bool;
}

impl Element for f32 {
    const DTYPE: &'static str = "float32";
    fn accepts(code: u8) -> bool {
        code == b'f'
    }
}

impl Element for f64 {
    const DTYPE: &'static str = "float64";
    fn accepts(code: u8) -> bool {
        code == b'd'
    }
}

impl Element for i32 {
    const DTYPE: &'static str = "int32";
    fn accepts(code: u8) -> bool {
        matches!(code, b'i' | b'l')
    }
}

impl Element for i64 {
    const DTYPE: &'static str = "int64";
    fn accepts(code: u8) -> bool {
        matches!(code, b'l' | b'q')
    }
}

/// `u8` stands for a bool mask (format `'?'`, one byte per entry, 0 or 1); the
/// trie writes only 0 and 1 and reads any non-zero byte as true.
impl Element for u8 {
    const DTYPE: &'static str = "bool";
    fn accepts(code: u8) -> bool {
        code == b'?'
    }
}

/// One dimension of an expected shape.
#[derive(Clone, Copy, Debug)]
pub enum Dim {
    /// Exactly this length.
    Is(usize),
    /// Any length; the name shows in errors ("B").
    Any(&'static str),
}

/// The byte ranges of the buffers that calls into the core hold now, with
/// whether the call writes them: the borrow registry of [`Claim`].
static CLAIMED: Mutex<Vec<Claimed>> = Mutex::new(Vec::new());

/// Numbers the claims, so that each removes its own entry.
static NEXT_CLAIM: AtomicU64 = AtomicU64::new(0);

struct Claimed {
    id: u64,
    bytes: Range<usize>,
    writes: bool,
}

/// A call's claim on a buffer's bytes, from when it is checked until it is
/// released, across the time the GIL is released.
///
/// Python threads can pass one array to two calls at once; the per-call check
/// cannot see that, and the two calls would then hold a mutable slice and
/// another slice of the same memory while they run without the GIL. So every
/// buffer is claimed here, as a reader or a writer, and a claim that would
/// alias is refused at once with a ValueError naming the argument (rather than
/// waited for: two calls writing one output, or one reading what another
/// writes, is a bug in the caller, and results written over each other would
/// be wrong whatever the order). Readers share. Only calls into this module
/// are seen; Python code writing an array that a call is reading is the
/// caller's race, as with any C extension.
struct Claim {
    id: u64,
}

impl Claim {
    fn new(name: &str, bytes: Range<usize>, writes: bool) -> PyResult<Option<Claim>> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let mut claimed = CLAIMED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let clash =
            claimed.iter().find(|c| (writes || c.writes) && c.bytes.start < bytes.end && bytes.start < c.bytes.end);
        if let Some(c) = clash {
            let (what, action) = if c.writes { ("writing", "writes") } else { ("reading", "reads") };
            let yours = if writes { "written" } else { "read" };
            return Err(PyValueError::new_err(format!(
                "{name} shares memory with an array that another call into the core is {what} now \
                 (from another thread); an array that one call {action} cannot be {yours} by another \
                 at the same time: give each call its own output"
            )));
        }
        let id = NEXT_CLAIM.fetch_add(1, Ordering::Relaxed);
        claimed.push(Claimed { id, bytes, writes });
        Ok(Some(Claim { id }))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(at) = claimed.iter().position(|c| c.id == self.id) {
            claimed.swap_remove(at);
        }
    }
}

/// A held buffer of any format: acquired, C-contiguous, released on drop.
struct Held<'py> {
    view: Box<PyBufferView>,
    name: &'static str,
    shape: Vec<usize>,
    /// Set once the buffer is checked for its use (see [`Held::claim`]).
    claim: Option<Claim>,
    _py: Python<'py>,
}

impl<'py> Held<'py> {
    fn acquire(obj: &'py PyAny, name: &'static str) -> PyResult<Self> {
        let py = obj.py();
        // SAFETY: an all-zero Py_buffer (null pointers, zero sizes) is a valid
        // value that PyObject_GetBuffer overwrites.
        let mut view: Box<PyBufferView> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: the GIL is held (`py`), `obj` is a live object and `view`
        // points to a Py_buffer that stays at its address until released.
        if unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *view, PYBUF_RECORDS_RO) } != 0 {
            let cause = PyErr::fetch(py);
            let kind = obj.get_type().name().unwrap_or("?").to_owned();
            return Err(PyTypeError::new_err(format!(
                "{name} must be an array supporting the buffer protocol, not {kind} ({})",
                cause.value(py)
            )));
        }
        let ndim = usize::try_from(view.ndim).unwrap_or(0);
        let shape = if view.shape.is_null() {
            // Only a 0-d or a plain byte buffer comes without a shape.
            if ndim == 0 {
                Vec::new()
            } else {
                vec![view.len as usize]
            }
        } else {
            // SAFETY: a filled Py_buffer's `shape` has `ndim` entries.
            unsafe { std::slice::from_raw_parts(view.shape, ndim) }.iter().map(|&d| d as usize).collect()
        };
        let held = Held { view, name, shape, claim: None, _py: py };
        if !held.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("{name} must be C-contiguous")));
        }
        Ok(held)
    }

    fn is_c_contiguous(&self) -> bool {
        let v = &*self.view;
        if v.strides.is_null() || v.len == 0 {
            return true;
        }
        // SAFETY: a filled Py_buffer asked for strides has `ndim` of them.
        let strides = unsafe { std::slice::from_raw_parts(v.strides, self.shape.len()) };
        let mut expected = v.itemsize;
        for (&dim, &stride) in self.shape.iter().zip(strides).rev() {
            if dim > 1 && stride != expected {
                return false;
            }
            expected *= dim as Py_ssize_t;
        }
        true
    }

    /// The format string, `"B"` when the exporter gives none.
    fn format(&self) -> String {
        if self.view.format.is_null() {
            return "B".to_owned();
        }
        // SAFETY: a non-null format is a NUL-terminated string owned by the exporter.
        unsafe { std::ffi::CStr::from_ptr(self.view.format) }.to_string_lossy().into_owned()
    }

    /// The single format code of a native-order buffer format, if it is one.
    fn native_code(&self) -> Option<u8> {
        let format = self.format();
        let code = match format.as_bytes() {
            [c] => *c,
            [b'@', c] => *c,
            [b'=' | b'<', c] if cfg!(target_endian = "little") => *c,
            [b'>' | b'!', c] if cfg!(target_endian = "big") => *c,
            _ => return None,
        };
        Some(code)
    }

    fn holds<T: Element>(&self) -> bool {
        self.view.itemsize as usize == std::mem::size_of::<T>() && self.native_code().is_some_and(T::accepts)
    }

    /// The element type in words, as numpy names it where it can.
    fn dtype(&self) -> String {
        let bits = self.view.itemsize * 8;
        match self.native_code() {
            Some(b'b' | b'h' | b'i' | b'l' | b'q' | b'n') => format!("int{bits}"),
            Some(b'B' | b'H' | b'I' | b'L' | b'Q' | b'N') => format!("uint{bits}"),
            Some(b'e' | b'f' | b'd') => format!("float{bits}"),
            Some(b'?') => "bool".to_owned(),
            _ => format!("buffer format '{}'", self.format()),
        }
    }

    fn typed<T: Element>(self) -> PyResult<Self> {
        if !self.holds::<T>() {
            return Err(PyTypeError::new_err(format!("{} must hold {}, not {}", self.name, T::DTYPE, self.dtype())));
        }
        self.aligned::<T>()
    }

    fn aligned<T: Element>(self) -> PyResult<Self> {
        if !(self.view.buf as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(PyValueError::new_err(format!("{} must be aligned for {}", self.name, T::DTYPE)));
        }
        Ok(self)
    }

    fn expect_shape(self, want: &[Dim]) -> PyResult<Self> {
        let fits = self.shape.len() == want.len()
            && self
                .shape
                .iter()
                .zip(want)
                .all(|(&got, dim)| matches!(dim, Dim::Any(_)) || matches!(dim, Dim::Is(n) if *n == got));
        if !fits {
            let want: Vec<String> = want
                .iter()
                .map(|d| match d {
                    Dim::Is(n) => n.to_string(),
                    Dim::Any(name) => (*name).to_owned(),
                })
                .collect();
            let got: Vec<String> = self.shape.iter().map(usize::to_string).collect();
            return Err(PyValueError::new_err(format!(
                "{} must have shape {}, not {}",
                self.name,
                tuple(&want),
                tuple(&got)
            )));
        }
        Ok(self)
    }

    /// Register the buffer's bytes as read (or written) by this call until it is released.
    fn claim(mut self, writes: bool) -> PyResult<Self> {
        self.claim = Claim::new(self.name, self.bytes(), writes)?;
        Ok(self)
    }

    fn bytes(&self) -> Range<usize> {
        let start = self.view.buf as usize;
        start..start + self.view.len as usize
    }

    /// The `len / size_of::<T>()` elements, `T` checked by [`Held::typed`].
    fn elements<T: Element>(&self) -> *mut T {
        self.view.buf.cast()
    }

    fn count<T: Element>(&self) -> usize {
        self.view.len as usize / std::mem::size_of::<T>()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // SAFETY: the buffer was acquired in `acquire` and is released once; the
        // GIL is held, since `Held` carries a `Python` token and so cannot leave
        // the thread or enter `allow_threads`.
        unsafe { PyBuffer_Release(&mut *self.view) }
    }
}

/// Python's tuple notation: `(5,)`, `(B, 5)`, `()`.
fn tuple(dims: &[String]) -> String {
    match dims {
        [one] => format!("({one},)"),
        _ => format!("({})", dims.join(", ")),
    }
}

/// A held, checked, readable buffer of `T`s.
pub struct Buffer<'py, T: Element> {
    held: Held<'py>,
    _t: PhantomData<T>,
}

impl<'py, T: Element> Buffer<'py, T> {
    /// `obj`'s buffer, which must hold `T`s in the shape `shape`; errors name `name`.
    pub fn new(obj: &'py PyAny, name: &'static str, shape: &[Dim]) -> PyResult<Self> {
        let held = Held::acquire(obj, name)?.typed::<T>()?.expect_shape(shape)?;
        Buffer::reading(held)
    }

    /// `obj`'s buffer, which must hold `T`s, in any shape.
    pub fn of_any_shape(obj: &'py PyAny, name: &'static str) -> PyResult<Self> {
        Buffer::reading(Held::acquire(obj, name)?.typed::<T>()?)
    }

    fn reading(held: Held<'py>) -> PyResult<Self> {
        Ok(Buffer { held: held.claim(false)?, _t: PhantomData })
    }

    pub fn shape(&self) -> &[usize] {
        &self.held.shape
    }

    pub fn as_slice(&self) -> &[T] {
        let n = self.held.count::<T>();
        if n == 0 {
            return &[];
        }
        // SAFETY: the held buffer has `n` C-contiguous, aligned `T`s (checked in
        // `new`) that stay in place until `self.held` releases it, and its claim
        // keeps every other call into the core from writing them meanwhile;
        // Python code writing them concurrently is the caller's race, as with
        // any C extension reading an array without the GIL.
        unsafe { std::slice::from_raw_parts(self.held.elements::<T>(), n) }
    }
}

/// Weights of either float type.
pub enum Floats<'py> {
    F32(Buffer<'py, f32>),
    F64(Buffer<'py, f64>),
}

impl<'py> Floats<'py> {
    /// `obj`'s buffer, which must hold float32 or float64 in the shape `shape`.
    pub fn new(obj: &'py PyAny, name: &'static str, shape: &[Dim]) -> PyResult<Self> {
        let held = Held::acquire(obj, name)?;
        let floats = if held.holds::<f32>() {
            Floats::F32(Buffer::reading(held.aligned::<f32>()?.expect_shape(shape)?)?)
        } else if held.holds::<f64>() {
            Floats::F64(Buffer::reading(held.aligned::<f64>()?.expect_shape(shape)?)?)
        } else {
            return Err(PyTypeError::new_err(format!("{name} must hold float32 or float64, not {}", held.dtype())));
        };
        Ok(floats)
    }

    pub fn shape(&self) -> &[usize] {
        &self.held().shape
    }

    fn held(&self) -> &Held<'py> {
        match self {
            Floats::F32(b) => &b.held,
            Floats::F64(b) => &b.held,
        }
    }
}

/// Either integer type.
pub enum Ints<'py> {
    I32(Buffer<'py, i32>),
    I64(Buffer<'py, i64>),
}

impl<'py> Ints<'py> {
    /// `obj`'s buffer, which must hold int32 or int64 in the shape `shape`.
    pub fn new(obj: &'py PyAny, name: &'static str, shape: &[Dim]) -> PyResult<Self> {
        let held = Held::acquire(obj, name)?;
        let ints = if held.holds::<i32>() {
            Ints::I32(Buffer::reading(held.aligned::<i32>()?.expect_shape(shape)?)?)
        } else if held.holds::<i64>() {
            Ints::I64(Buffer::reading(held.aligned::<i64>()?.expect_shape(shape)?)?)
        } else {
            return Err(PyTypeError::new_err(format!("{name} must hold int32 or int64, not {}", held.dtype())));
        };
        Ok(ints)
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Ints::I32(b) => b.shape(),
            Ints::I64(b) => b.shape(),
        }
    }
}

/// What an output must not overlap.
pub trait Input {
    fn bytes(&self) -> Range<usize>;
}

impl<T: Element> Input for Buffer<'_, T> {
    fn bytes(&self) -> Range<usize> {
        self.held.bytes()
    }
}

impl Input for Floats<'_> {
    fn bytes(&self) -> Range<usize> {
        self.held().bytes()
    }
}

impl Input for Ints<'_> {
    fn bytes(&self) -> Range<usize> {
        match self {
            Ints::I32(b) => b.bytes(),
            Ints::I64(b) => b.bytes(),
        }
    }
}

/// A held, checked, writable buffer of `T`s.
pub struct BufferMut<'py, T: Element> {
    held: Held<'py>,
    _t: PhantomData<T>,
}

impl<'py, T: Element> BufferMut<'py, T> {
    /// `obj`'s buffer, which must be writable, hold `T`s in the shape `shape` and
    /// share no byte with any of `inputs` (their slices are read while this one
    /// is written); errors name `name`.
    pub fn new(obj: &'py PyAny, name: &'static str, shape: &[Dim], inputs: &[&dyn Input]) -> PyResult<Self> {
        let held = Held::acquire(obj, name)?;
        if held.view.readonly != 0 {
            return Err(PyValueError::new_err(format!("{name} must be writable (it is read-only)")));
        }
        let held = held.typed::<T>()?.expect_shape(shape)?;
        let mine = held.bytes();
        if !mine.is_empty() && inputs.iter().map(|i| i.bytes()).any(|b| b.start < mine.end && mine.start < b.end) {
            return Err(PyValueError::new_err(format!("{name} must not share memory with an input")));
        }
        Ok(BufferMut { held: held.claim(true)?, _t: PhantomData })
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        let n = self.held.count::<T>();
        if n == 0 {
            return &mut [];
        }
        // SAFETY: as in `Buffer::as_slice`, and the buffer is writable, overlaps
        // no input of the call, its claim keeps every other call from holding a
        // slice of these bytes, and `&mut self` makes this the only slice of it
        // that this call holds.
        unsafe { std::slice::from_raw_parts_mut(self.held.elements::<T>(), n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::types::{IntoPyDict, PyDict};

    fn eval<'py>(py: Python<'py>, code: &str) -> &'py PyAny {
        let globals = PyDict::new(py);
        globals.set_item("array", py.import("array").unwrap()).unwrap();
        py.eval(code, Some(globals), None).unwrap()
    }

    fn message<T>(py: Python<'_>, r: PyResult<T>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{}: {}", e.get_type(py).name().unwrap(), e.value(py)),
        }
    }

    #[test]
    fn typed_views_of_memoryviews_and_arrays() {
        pyo3::prepare_freethreaded_python();
        Python::with_gil(|py| {
            let a = eval(py, "memoryview(array.array('d', range(6))).cast('B').cast('d', [2, 3])");
            let b = Buffer::<f64>::new(a, "ws", &[Dim::Any("B"), Dim::Is(3)]).unwrap();
            assert_eq!(b.shape(), &[2, 3]);
            assert_eq!(b.as_slice(), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
            let f = eval(py, "array.array('f', [1.5, 2.5])");
            assert!(matches!(Floats::new(f, "ws", &[Dim::Is(2)]).unwrap(), Floats::F32(_)));
            let q = eval(py, "array.array('q', [1, -1])");
            assert!(matches!(Ints::new(q, "t", &[Dim::Is(2)]).unwrap(), Ints::I64(_)));
            let mask = eval(py, "memoryview(bytearray(3)).cast('?')");
            let mut m = BufferMut::<u8>::new(mask, "out", &[Dim::Is(3)], &[]).unwrap();
            m.as_mut_slice()[1] = 1;
            drop(m);
            assert!(mask.get_item(1).unwrap().extract::<bool>().unwrap());
            let out = eval(py, "array.array('d', [0.0, 0.0])");
            BufferMut::<f64>::new(out, "out", &[Dim::Is(2)], &[]).unwrap().as_mut_slice()[1] = 7.0;
            assert_eq!(out.get_item(1).unwrap().extract::<f64>().unwrap(), 7.0);
        });
    }

    #[test]
    fn refusals_name_the_argument() {
        pyo3::prepare_freethreaded_python();
        Python::with_gil(|py| {
            let d = eval(py, "array.array('d', range(6))");
            let shape = [Dim::Any("B"), Dim::Is(49152)];
            assert_eq!(
                message(py, Buffer::<f64>::new(d, "ws", &shape)),
                "ValueError: ws must have shape (B, 49152), not (6,)"
            );
            assert_eq!(
                message(py, Buffer::<f64>::new(d, "ws", &[Dim::Is(5)])),
                "ValueError: ws must have shape (5,), not (6,)"
            );
            assert_eq!(
                message(py, Buffer::<f32>::new(d, "ws", &[Dim::Is(6)])),
                "TypeError: ws must hold float32, not float64"
            );
            let i = eval(py, "array.array('i', range(6))");
            assert_eq!(
                message(py, Floats::new(i, "ws", &[Dim::Is(6)])),
                "TypeError: ws must hold float32 or float64, not int32"
            );
            let strided = eval(py, "memoryview(array.array('d', range(6)))[::2]");
            assert_eq!(
                message(py, Buffer::<f64>::new(strided, "ws", &[Dim::Is(3)])),
                "ValueError: ws must be C-contiguous"
            );
            let frozen = eval(py, "bytes(6)");
            assert_eq!(
                message(py, BufferMut::<u8>::new(frozen, "out", &[Dim::Is(6)], &[])),
                "ValueError: out must be writable (it is read-only)"
            );
            let raw = eval(py, "bytearray(6)");
            assert_eq!(
                message(py, BufferMut::<u8>::new(raw, "out", &[Dim::Is(6)], &[])),
                "TypeError: out must hold bool, not uint8"
            );
            let unaligned = eval(py, "memoryview(bytearray(17))[1:].cast('d')");
            assert_eq!(
                message(py, Buffer::<f64>::new(unaligned, "ws", &[Dim::Is(2)])),
                "ValueError: ws must be aligned for float64"
            );
            let list = eval(py, "[1.0]");
            assert!(message(py, Buffer::<f64>::new(list, "ws", &[Dim::Is(1)]))
                .starts_with("TypeError: ws must be an array supporting the buffer protocol, not list"));
        });
    }

    #[test]
    fn an_output_overlapping_an_input_is_refused() {
        pyo3::prepare_freethreaded_python();
        Python::with_gil(|py| {
            let base = eval(py, "memoryview(array.array('d', range(8)))");
            let input =
                Buffer::<f64>::new(base.get_item(pyo3::types::PySlice::new(py, 0, 4, 1)).unwrap(), "ws", &[Dim::Is(4)])
                    .unwrap();
            let overlapping = base.get_item(pyo3::types::PySlice::new(py, 3, 7, 1)).unwrap();
            assert_eq!(
                message(py, BufferMut::<f64>::new(overlapping, "out", &[Dim::Is(4)], &[&input])),
                "ValueError: out must not share memory with an input"
            );
            let apart = base.get_item(pyo3::types::PySlice::new(py, 4, 8, 1)).unwrap();
            assert!(BufferMut::<f64>::new(apart, "out", &[Dim::Is(4)], &[&input]).is_ok());
        });
    }

    /// Runs `probe` on another thread, holding the GIL there, while this one
    /// waits with the GIL released (as a call computing does).
    fn from_another_thread<R: Send + 'static>(
        py: Python<'_>,
        obj: &PyAny,
        probe: impl FnOnce(Python<'_>, &PyAny) -> R + Send + 'static,
    ) -> R {
        let obj: pyo3::PyObject = obj.into();
        let other = std::thread::spawn(move || Python::with_gil(|py| probe(py, obj.as_ref(py))));
        py.allow_threads(|| other.join().unwrap())
    }

    #[test]
    fn a_buffer_another_call_writes_is_neither_read_nor_written_by_a_second_one() {
        pyo3::prepare_freethreaded_python();
        Python::with_gil(|py| {
            let out = eval(py, "array.array('d', range(8))");
            let writing = BufferMut::<f64>::new(out, "out", &[Dim::Is(8)], &[]).unwrap();
            let (write, read) = from_another_thread(py, out, |py, out| {
                let view = py.eval("memoryview(o)[6:]", None, Some([("o", out)].into_py_dict(py))).unwrap();
                let write = message(py, BufferMut::<f64>::new(view, "out", &[Dim::Is(2)], &[]));
                (write, message(py, Buffer::<f64>::new(out, "ws", &[Dim::Is(8)])))
            });
            assert!(write.starts_with("ValueError: out shares memory with an array that another call into the core is writing now (from another thread)"), "{write}");
            assert!(
                read.starts_with(
                    "ValueError: ws shares memory with an array that another call into the core is writing now"
                ),
                "{read}"
            );
            drop(writing);
            // Released: another thread may write it, and two may read it at once.
            assert!(
                from_another_thread(py, out, |_, out| BufferMut::<f64>::new(out, "out", &[Dim::Is(8)], &[]).is_ok())
            );
            let reading = Buffer::<f64>::new(out, "ws", &[Dim::Is(8)]).unwrap();
            let (read, write) = from_another_thread(py, out, |py, out| {
                let read = Buffer::<f64>::new(out, "ws", &[Dim::Is(8)]).is_ok();
                (read, message(py, BufferMut::<f64>::new(out, "out", &[Dim::Is(8)], &[])))
            });
            assert!(read);
            assert!(
                write.starts_with(
                    "ValueError: out shares memory with an array that another call into the core is reading now"
                ),
                "{write}"
            );
            drop(reading);
        });
    }

    #[test]
    fn a_held_buffer_pins_its_exporter_until_dropped() {
        pyo3::prepare_freethreaded_python();
        Python::with_gil(|py| {
            let grow = eval(py, "bytearray(2)");
            let globals = PyDict::new(py);
            globals.set_item("b", grow).unwrap();
            // Growing a bytearray whose buffer is held fails; after release it works.
            let raw = Held::acquire(grow, "b").unwrap();
            assert!(py.run("b.extend(b'x')", Some(globals), None).is_err());
            drop(raw);
            py.run("b.extend(b'x')", Some(globals), None).unwrap();
            assert_eq!(grow.len().unwrap(), 3);
        });
    }
}
