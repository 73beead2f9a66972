//! The Python module `tensorgate_native`: the `Server` class and the conversions between the
//! hand-over's Rust values and the plain tuples of `tensorgate_native.pyi`.
use std::ffi::{c_int, c_void};
use std::time::Duration;

use bytes::Bytes;
use numpy::{Element, PyArray1, PyUntypedArray};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use pyo3::{ffi, intern};

use crate::handover::{Failure, Item, Metadata, Outcome, Reply};
use crate::pb::inference::infer_parameter::ParameterChoice;
use crate::pb::inference::model_infer_response::InferOutputTensor;
use crate::pb::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};
use crate::server::Core;

/// Read-only view of one `raw_input_contents` entry: the request's bytes, not a copy.
#[pyclass(frozen, module = "tensorgate_native")]
pub struct RawBuffer {
    data: Bytes,
}

#[pymethods]
impl RawBuffer {
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let data = &slf.get().data;
        // SAFETY: `view` comes from the interpreter; the buffer holds a reference to `slf`,
        // which keeps `data` alive and unchanged (Bytes is immutable). readonly=1 makes a
        // writable request fail with BufferError.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                data.as_ptr() as *mut c_void,
                data.len() as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.data.len()
    }
}

/// One native gRPC server on a socket Python bound (see tensorgate_native.pyi).
#[pyclass(frozen, module = "tensorgate_native")]
pub struct Server {
    core: Core,
}

type TlsPem<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Option<Bound<'py, PyBytes>>,
);

fn tls_config(pem: &TlsPem<'_>) -> PyResult<std::sync::Arc<rustls::ServerConfig>> {
    let (cert, key, ca) = pem;
    crate::tls::config(
        cert.as_bytes(),
        key.as_bytes(),
        ca.as_ref().map(|c| c.as_bytes()),
    )
    .map_err(PyValueError::new_err)
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (*, fd, max_message_bytes, tls = None, worker_threads = 1, mode = "gateway"))]
    fn new(
        fd: i32,
        max_message_bytes: usize,
        tls: Option<TlsPem<'_>>,
        worker_threads: usize,
        mode: &str,
    ) -> PyResult<Self> {
        let mode: crate::grpc::Mode = mode.parse().map_err(PyValueError::new_err)?;
        let tls = tls.as_ref().map(tls_config).transpose()?;
        let core = Core::new(fd, max_message_bytes, tls, worker_threads)
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        core.state.set_mode(mode);
        Ok(Self { core })
    }

    fn start(&self) -> PyResult<()> {
        self.core
            .start()
            .map_err(|e| PyOSError::new_err(e.to_string()))
    }

    fn eventfd(&self) -> i32 {
        self.core.state.hub.eventfd()
    }

    /// Everything that arrived since the last call, as tuples.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self.core.state.hub.take();
        let list = PyList::empty(py);
        for item in items {
            list.append(item_to_py(py, item)?)?;
        }
        Ok(list)
    }

    /// Results of a tick: `[(slot, result), ...]`. A malformed result fails its own call
    /// (INTERNAL), not the others.
    fn complete(&self, py: Python<'_>, results: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut outcomes = Vec::new();
        for entry in results.try_iter()? {
            let entry = entry?;
            let (slot, result): (u64, Bound<'_, PyAny>) = entry.extract()?;
            let outcome = outcome_from_py(&result).unwrap_or_else(|e| {
                Outcome::Failed(Failure {
                    code: tonic::Code::Internal as i32,
                    name: "INTERNAL".into(),
                    message: format!("native front end: malformed result: {e}"),
                })
            });
            outcomes.push((slot, outcome));
        }
        let hub = &self.core.state.hub;
        py.detach(|| {
            for (slot, outcome) in outcomes {
                hub.complete(slot, outcome);
            }
        });
        Ok(())
    }

    fn set_health(&self, py: Python<'_>, service: &str, status: i32) {
        py.detach(|| self.core.set_health(service, status));
    }

    #[pyo3(signature = (token))]
    fn set_live_ready_token(&self, token: Option<String>) {
        *self.core.state.live_ready_token.write().unwrap() = token;
    }

    #[pyo3(signature = (cert_pem, key_pem, client_ca_pem = None))]
    fn reload_tls(
        &self,
        cert_pem: Bound<'_, PyBytes>,
        key_pem: Bound<'_, PyBytes>,
        client_ca_pem: Option<Bound<'_, PyBytes>>,
    ) -> PyResult<()> {
        let config = tls_config(&(cert_pem, key_pem, client_ca_pem))?;
        self.core.reload_tls(config);
        Ok(())
    }

    fn end_streams(&self) {
        self.core.end_streams();
    }

    fn stop(&self, grace: f64) {
        self.core
            .stop(Duration::from_secs_f64(grace.clamp(0.0, 1e6)));
    }

    fn wait(&self, py: Python<'_>) {
        py.detach(|| self.core.wait());
    }

    #[getter]
    fn stopped(&self) -> bool {
        self.core.is_stopped()
    }

    fn in_flight(&self) -> usize {
        self.core.state.hub.in_flight()
    }
}

// -- Rust → Python ---------------------------------------------------------------------------

fn metadata_to_py<'py>(py: Python<'py>, metadata: Metadata) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (key, value) in metadata {
        dict.set_item(key, value)?;
    }
    Ok(dict)
}

fn item_to_py<'py>(py: Python<'py>, item: Item) -> PyResult<Bound<'py, PyTuple>> {
    match item {
        Item::Infer {
            slot,
            stream,
            request,
            metadata,
            timeout,
        } => (
            intern!(py, "infer"),
            slot,
            stream,
            request_to_py(py, request)?,
            metadata_to_py(py, metadata)?,
            timeout,
        )
            .into_pyobject(py),
        Item::Open {
            slot,
            method,
            metadata,
        } => (
            intern!(py, "open"),
            slot,
            method,
            metadata_to_py(py, metadata)?,
        )
            .into_pyobject(py),
        Item::Cold {
            slot,
            method,
            payload,
            metadata,
            timeout,
        } => (
            intern!(py, "cold"),
            slot,
            method,
            PyBytes::new(py, &payload),
            metadata_to_py(py, metadata)?,
            timeout,
        )
            .into_pyobject(py),
        Item::Cancel { slot } => (intern!(py, "cancel"), slot).into_pyobject(py),
    }
}

fn array<'py, T: Element>(
    py: Python<'py>,
    dict: &Bound<'py, PyDict>,
    name: &str,
    values: Vec<T>,
) -> PyResult<()> {
    if !values.is_empty() {
        dict.set_item(name, PyArray1::from_vec(py, values))?;
    }
    Ok(())
}

fn contents_to_py<'py>(
    py: Python<'py>,
    contents: Option<InferTensorContents>,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let Some(c) = contents else {
        return Ok(dict);
    };
    array(py, &dict, "bool_contents", c.bool_contents)?;
    array(py, &dict, "int_contents", c.int_contents)?;
    array(py, &dict, "int64_contents", c.int64_contents)?;
    array(py, &dict, "uint_contents", c.uint_contents)?;
    array(py, &dict, "uint64_contents", c.uint64_contents)?;
    array(py, &dict, "fp32_contents", c.fp32_contents)?;
    array(py, &dict, "fp64_contents", c.fp64_contents)?;
    if !c.bytes_contents.is_empty() {
        let items = c.bytes_contents.iter().map(|b| PyBytes::new(py, b));
        dict.set_item("bytes_contents", PyList::new(py, items)?)?;
    }
    Ok(dict)
}

fn parameter_to_py<'py>(py: Python<'py>, p: InferParameter) -> PyResult<Bound<'py, PyAny>> {
    Ok(match p.parameter_choice {
        None => py.None().into_bound(py),
        Some(ParameterChoice::BoolParam(v)) => v.into_pyobject(py)?.to_owned().into_any(),
        Some(ParameterChoice::Int64Param(v)) => v.into_pyobject(py)?.into_any(),
        Some(ParameterChoice::Uint64Param(v)) => v.into_pyobject(py)?.into_any(),
        Some(ParameterChoice::DoubleParam(v)) => v.into_pyobject(py)?.into_any(),
        Some(ParameterChoice::StringParam(v)) => PyString::new(py, &v).into_any(),
    })
}

/// `(model_name, model_version, id, inputs, raw, outputs, parameters)`.
fn request_to_py<'py>(py: Python<'py>, r: ModelInferRequest) -> PyResult<Bound<'py, PyTuple>> {
    let inputs = PyList::empty(py);
    for input in r.inputs {
        inputs.append((
            input.name,
            input.datatype,
            PyTuple::new(py, input.shape)?,
            contents_to_py(py, input.contents)?,
        ))?;
    }
    let raw = PyList::empty(py);
    for data in r.raw_input_contents {
        raw.append(Bound::new(py, RawBuffer { data })?)?;
    }
    let outputs = PyList::new(py, r.outputs.into_iter().map(|o| o.name))?;
    let parameters = PyDict::new(py);
    for (name, p) in r.parameters {
        parameters.set_item(name, parameter_to_py(py, p)?)?;
    }
    (
        r.model_name,
        r.model_version,
        r.id,
        inputs,
        raw,
        outputs,
        parameters,
    )
        .into_pyobject(py)
}

// -- Python → Rust ---------------------------------------------------------------------------

/// A Python object whose memory a reply refers to instead of copying it: a `bytes` object
/// or a numpy array, held by a strong reference. Dropped on a tokio thread (once the reply
/// is encoded), the reference goes to pyo3's pool of deferred decrefs, which the next call
/// into this module (`take`, `complete`) empties with the GIL held.
struct Held {
    _object: Py<PyAny>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the pointer is into the held object's memory, which lives as long as the
// reference and does not move: a bytes object is immutable; a numpy array's data pointer
// is fixed for its lifetime (`resize` refuses an array that another reference holds), and
// the pipeline hands over arrays it no longer writes. Only reads happen through `ptr`.
unsafe impl Send for Held {}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see `unsafe impl Send`: `len` readable bytes at `ptr` while `_object` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// The bytes of `data` for a reply: a `bytes` object or a C-contiguous numpy array without
/// a copy (see `Held`), any other C-contiguous buffer copied once.
fn raw_bytes(data: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    let zero_copy = data.is_instance_of::<PyBytes>() || data.is_instance_of::<PyUntypedArray>();
    let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::zeroed();
    // SAFETY: a simple (contiguous, unformatted) buffer request; on success the view is
    // initialized, read for its length, then released exactly once.
    unsafe {
        if ffi::PyObject_GetBuffer(data.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_SIMPLE) == -1 {
            return Err(PyErr::fetch(data.py()));
        }
        let view = view.assume_init_mut();
        let (ptr, len) = (view.buf as *const u8, view.len as usize);
        let out = if len == 0 {
            Bytes::new()
        } else if zero_copy {
            Bytes::from_owner(Held {
                _object: data.clone().unbind(),
                ptr,
                len,
            })
        } else {
            Bytes::copy_from_slice(std::slice::from_raw_parts(ptr, len))
        };
        ffi::PyBuffer_Release(view);
        Ok(out)
    }
}

fn outcome_from_py(result: &Bound<'_, PyAny>) -> PyResult<Outcome> {
    let result = result.cast::<PyTuple>()?;
    let code: i32 = result.get_item(0)?.extract()?;
    if code != 0 {
        let (_, name, message): (i32, String, String) = result.extract()?;
        return Ok(Outcome::Failed(Failure {
            code,
            name,
            message,
        }));
    }
    match result.len() {
        3 => {
            let (_, payload, trailers): (i32, Bound<'_, PyAny>, Metadata) = result.extract()?;
            Ok(Outcome::Reply {
                message: Reply::Bytes(raw_bytes(&payload)?),
                trailers,
            })
        }
        6 => {
            let (_, model_name, model_version, id, outputs, trailers): (
                i32,
                String,
                String,
                String,
                Bound<'_, PyAny>,
                Metadata,
            ) = result.extract()?;
            let mut tensors = Vec::new();
            let mut raw = Vec::new();
            for output in outputs.try_iter()? {
                let (name, datatype, shape, data): (String, String, Vec<i64>, Bound<'_, PyAny>) =
                    output?.extract()?;
                raw.push(raw_bytes(&data)?);
                tensors.push(InferOutputTensor {
                    name,
                    datatype,
                    shape,
                    ..Default::default()
                });
            }
            Ok(Outcome::Reply {
                message: Reply::Infer(ModelInferResponse {
                    model_name,
                    model_version,
                    id,
                    outputs: tensors,
                    raw_output_contents: raw,
                    ..Default::default()
                }),
                trailers,
            })
        }
        n => Err(PyValueError::new_err(format!(
            "a result is (0, payload, trailers), (0, model, version, id, outputs, trailers) \
             or (code, name, message), not a {n}-tuple"
        ))),
    }
}

#[pymodule]
fn tensorgate_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Server>()?;
    m.add_class::<RawBuffer>()?;
    m.add("STREAM_WINDOW", crate::grpc::STREAM_WINDOW)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
